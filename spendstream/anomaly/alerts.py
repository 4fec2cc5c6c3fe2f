"""An :class:`Anomaly` as a ``spendstream.budget.alerts`` value of kind "anomaly". Pure.

The value keeps the budget alert fields (contracts.py, "budget alerts") so the notify stage, the
channels and the alert history take it unchanged, read as:
- ``budget_id`` "anomaly", ``budget_name`` "Spend anomaly: <project>[/<agent>]", ``scope`` the
  project (and agent), ``window`` "rolling_10m", ``window_start``/``window_end`` the 10 minutes
  (fewer, ``anomaly.window_minutes``, when the stage has counted the stream for less than 10 minutes);
- ``spent_*`` the window's spend, ``limit_*`` its usual spend (as many usual minutes for that hour),
  ``percent_used`` the ratio in percent; ``threshold`` and ``projected_*`` null;
- ``top`` the models by share of the excess, ``event_id`` an example event of the episode;
plus ``anomaly``: the explanation (see :func:`details`).
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import Any

from spendstream.anomaly.baseline import MINUTE_MS
from spendstream.anomaly.detector import Anomaly
from spendstream.contracts import SCHEMA_VERSION, nanos_to_usd_str
from spendstream.timeutil import format_epoch_ms

ANOMALY_BUDGET_ID = "anomaly"
ANOMALY_WINDOW = "rolling_10m"
#: percent_used is a Decimal(18, 4) in budget_alerts: a window over a usual of ~0 is capped
MAX_PERCENT = Decimal("100000000000000")


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def scope_name(project: str, agent: str) -> str:
    return f"{project}/{agent}" if agent else project


def details(a: Anomaly) -> dict[str, Any]:
    """The explanation: the window against the usual, ``ratio`` = the episode's spend over its
    usual (the runaway's rate; the 10-minute window's ``window_ratio`` is diluted by the normal
    minutes before it), the spike's kind (calls x N: volume,
    tokens per call x N: size, cost per token x N: price_mix, over the episode's minutes), the
    excess by model and example event ids."""
    return {
        "project": a.project,
        "agent": a.agent or None,
        "episode_start": format_epoch_ms(a.episode_start_ms),
        "window_minutes": (a.window_end_ms - a.window_start_ms) // MINUTE_MS,
        "window_usd": nanos_to_usd_str(a.window_nanos),
        "usual_usd": nanos_to_usd_str(a.usual_window_nanos),
        "excess_usd": nanos_to_usd_str(a.excess_nanos),
        "window_ratio": _round(a.ratio) if a.usual_window_nanos else None,
        "episode_usd": nanos_to_usd_str(a.episode_nanos),
        "usual_episode_usd": nanos_to_usd_str(a.usual_episode_nanos),
        "ratio": _round(a.episode_ratio) if a.usual_episode_nanos else None,
        "score": _round(a.score, 1),
        "alert_window_minutes": a.alert_window_minutes,
        "alert_window_usd": nanos_to_usd_str(a.alert_window_nanos),
        "minute_usd": nanos_to_usd_str(a.minute_nanos),
        "usual_minute_usd": nanos_to_usd_str(a.usual_minute_nanos),
        "spike_type": a.spike_type,
        "calls": a.calls,
        "usual_calls": _round(a.usual_calls),
        "calls_ratio": _round(a.calls_ratio),
        "tokens_per_call": _round(a.tokens_per_call, 1),
        "usual_tokens_per_call": _round(a.usual_tokens_per_call, 1),
        "size_ratio": _round(a.size_ratio),
        "price_ratio": _round(a.price_ratio),
        "models": [
            {
                "model": m.model,
                "spent_usd": nanos_to_usd_str(m.spent_nanos),
                "usual_usd": nanos_to_usd_str(m.usual_nanos),
                "excess_usd": nanos_to_usd_str(m.excess_nanos),
                "share": round(m.share, 3),
            }
            for m in a.models
        ],
        "event_ids": list(a.event_ids),
        "seasonality": a.seasonality,
        "baseline_samples": a.baseline_samples,
        "extreme": a.extreme,
    }


def percent(a: Anomaly) -> Decimal:
    if not a.usual_window_nanos:
        return MAX_PERCENT
    value = (Decimal(a.window_nanos) * 100 / Decimal(a.usual_window_nanos)).quantize(Decimal("0.01"), ROUND_FLOOR)
    return min(value, MAX_PERCENT)


def anomaly_alert_value(a: Anomaly, channels: tuple[str, ...], created_at_ms: int) -> dict[str, Any]:
    scope = {"project": a.project, **({"agent": a.agent} if a.agent else {})}
    return {
        "v": SCHEMA_VERSION,
        "alert_id": a.alert_id,
        "kind": "anomaly",
        "tenant": a.tenant,
        "budget_id": ANOMALY_BUDGET_ID,
        "budget_name": f"Spend anomaly: {scope_name(a.project, a.agent)}",
        "scope": scope,
        "window": ANOMALY_WINDOW,
        "timezone": "UTC",
        "window_start": format_epoch_ms(a.window_start_ms),
        "window_end": format_epoch_ms(a.window_end_ms),
        "threshold": None,
        "spent_usd": nanos_to_usd_str(a.window_nanos),
        "limit_usd": nanos_to_usd_str(a.usual_window_nanos),
        "spent_nanos": a.window_nanos,
        "limit_nanos": a.usual_window_nanos,
        "percent_used": str(percent(a)),
        "projected_usd": None,
        "projected_nanos": None,
        "projected_at": None,
        "top": [{"kind": "model", "name": m.model, "spent_usd": nanos_to_usd_str(m.spent_nanos)} for m in a.models],
        "event_id": a.event_ids[0] if a.event_ids else "",
        "event_time": format_epoch_ms(a.minute_ms),
        "channels": list(channels),
        "created_at": format_epoch_ms(created_at_ms),
        "anomaly": details(a),
    }
