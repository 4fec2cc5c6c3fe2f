"""What an alert says: a ``spendstream.budget.alerts`` value read as an :class:`Alert`, and the
text every channel shows of it. Pure.

The wire contract of the value (its fields, kinds and ``alert_id``) is written down once, in
spendstream/contracts.py, next to the other topics' values: the budgets stage produces it, the
notify stage consumes it. This module is the consumer's reading of it: what an alert must hold to
be delivered, the fields sent on (``generic_body``) and the human text (``summary``,
``detail_lines``).

User text (budget names, scope values, agent names) reaches e-mail headers and one-line
summaries: ``one_line`` turns every control character into a space wherever text is shown (a name
stored before the API refused them still delivers, as one line).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from spendstream.contracts import BUDGET_ALERT_KINDS

#: the generic body's fields, in this order; money as decimal strings (no *_nanos, no channels)
GENERIC_FIELDS = (
    "alert_id", "kind", "tenant", "budget_id", "budget_name", "scope", "window", "timezone",
    "window_start", "window_end", "threshold", "spent_usd", "limit_usd", "percent_used",
    "projected_usd", "projected_at", "top", "event_id", "event_time", "created_at",
)  # fmt: skip
#: what a reconciliation alert adds to the generic body (spendstream/contracts.py)
RECONCILIATION_FIELDS = (
    "date", "provider", "connection_id", "reported_usd", "tracked_usd", "difference_usd", "drift_pct", "unattributed_usd",
)  # fmt: skip
_REQUIRED = ("alert_id", "kind", "tenant", "budget_id", "spent_usd", "limit_usd", "channels")
#: alert ids go into headers verbatim (Idempotency-Key, Message-ID); budget_alert_id() makes "al_<hex>"
_ALERT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: C0 and C1 controls (CR, LF, NUL, TAB, NEL, ...) and the Unicode line and paragraph separators:
#: every character str.splitlines() breaks on, which is what the e-mail header policy refuses
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BadAlert(ValueError):
    """A budget.alerts value that is not an alert of contract v1."""


@dataclass(frozen=True)
class Alert:
    alert_id: str
    tenant: str
    kind: str
    channels: tuple[str, ...]
    #: the decoded record value (contract fields)
    fields: dict[str, Any]


def parse_alert(value: bytes | dict[str, Any]) -> Alert:
    try:
        data = orjson.loads(value) if isinstance(value, (bytes, bytearray, memoryview, str)) else value
    except orjson.JSONDecodeError as exc:
        raise BadAlert(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadAlert("not a JSON object")
    missing = [f for f in _REQUIRED if data.get(f) in (None, "")]
    if missing:
        raise BadAlert(f"missing {', '.join(missing)}")
    channels = data["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        raise BadAlert("channels must be a list of non-empty strings")
    if data["kind"] not in BUDGET_ALERT_KINDS:
        raise BadAlert(f"unknown kind {data['kind']!r}")
    if not isinstance(data["alert_id"], str) or not _ALERT_ID.fullmatch(data["alert_id"]):
        raise BadAlert("alert_id must be 1..128 of A-Z a-z 0-9 . _ : -")
    # a budget may list a channel twice; it is still one destination
    return Alert(str(data["alert_id"]), str(data["tenant"]), data["kind"], tuple(dict.fromkeys(channels)), data)


def created_at(alert: Alert) -> datetime | None:
    """When the budgets stage emitted the alert (its ``created_at``), if the value carries one."""
    try:
        emitted = datetime.fromisoformat(alert.fields["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    # callers subtract it from an aware "now": a naive stamp would raise there
    return emitted if emitted.tzinfo else emitted.replace(tzinfo=UTC)


def sample_alert(tenant: str, now: datetime) -> Alert:
    """A sample threshold alert marked ``"test": true``, for POST /v1/webhooks/{id}/test."""
    stamp = now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fields = {
        "alert_id": f"test_{secrets.token_hex(12)}", "kind": "threshold", "tenant": tenant,
        "budget_id": "test", "budget_name": "Test alert from Spendstream", "scope": {}, "window": "daily",
        "timezone": "UTC", "window_start": stamp, "window_end": None, "threshold": "80",
        "spent_usd": "8.000000000", "limit_usd": "10.000000000", "percent_used": "80.00",
        "projected_usd": None, "projected_at": None, "top": [], "event_id": "test", "event_time": stamp,
        "created_at": stamp, "channels": [], "test": True,
    }  # fmt: skip
    return Alert(fields["alert_id"], tenant, "threshold", (), fields)


# ------------------------------------------------------------------------------------- text


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def one_line(text: str) -> str:
    """``text`` with every control character and line break replaced by a space."""
    return _CONTROL.sub(" ", text)


def generic_body(alert: Alert) -> dict[str, Any]:
    """The alert's contract fields as sent on (the generic webhook's body, PagerDuty's details)."""
    f = alert.fields
    body = {name: f.get(name) for name in GENERIC_FIELDS}
    if alert.kind == "reconciliation":
        body.update({name: f.get(name) for name in RECONCILIATION_FIELDS})
    if f.get("test"):
        body["test"] = True
    if alert.kind == "anomaly":
        body["anomaly"] = f.get("anomaly")
    return body


def human_usd(amount: str | Decimal | None) -> str:
    """'8.010000000' -> '8.01', '0.000123400' -> '0.0001234': exact, at least two decimals."""
    if amount is None:
        return "?"
    try:
        d = Decimal(str(amount))
    except InvalidOperation:
        return str(amount)
    text = f"{d:f}"
    if "." in text:
        text = text.rstrip("0")
        whole, frac = text.split(".")
        text = f"{whole}.{frac.ljust(2, '0')}"
    else:
        text += ".00"
    return text


def _scope_text(scope: Any) -> str:
    if not scope:
        return "whole tenant"
    return ", ".join(f"{k}={v}" for k, v in sorted(scope.items()))


def summary(alert: Alert) -> str:
    """One line for humans (Slack text, PagerDuty summary, e-mail subject), whatever the budget's
    name holds: an e-mail subject with a line break would end the headers early or be refused."""
    return one_line(_summary(alert))


def _summary(alert: Alert) -> str:
    f = alert.fields
    name = f.get("budget_name") or f.get("budget_id")
    window = f.get("window") or "budget"
    limit = human_usd(f.get("limit_usd"))
    if alert.kind == "anomaly":
        a = f.get("anomaly") or {}
        ratio = a.get("ratio")
        times = f"{ratio}x" if ratio is not None else "far above"
        return (
            f"Spend anomaly in {_scope_text(f.get('scope'))}: spending {times} the usual since "
            f"{a.get('episode_start')} ({a.get('spike_type', '?')} spike); {human_usd(f.get('spent_usd'))} USD in "
            f"{a.get('window_minutes') or 10} minutes, usually {limit} USD"
        )
    if alert.kind == "reconciliation":
        return (
            f"{f.get('provider')} reported {human_usd(f.get('reported_usd'))} USD on {f.get('date')}, Spendstream "
            f"counted {human_usd(f.get('tracked_usd'))} USD: drift {f.get('drift_pct')}% (connection '{name}')"
        )
    if alert.kind == "forecast":
        return (
            f"Budget '{name}' is projected to reach {human_usd(f.get('projected_usd'))} USD in its {window} "
            f"window, over its {limit} USD limit"
        )
    return (
        f"Budget '{name}' crossed {human_usd(f.get('threshold')).removesuffix('.00')}% of its {window} limit: "
        f"{human_usd(f.get('spent_usd'))} of {limit} USD ({f.get('percent_used')}%)"
    )


def detail_lines(alert: Alert) -> list[str]:
    """The alert's details for humans (Slack's second block, the e-mail body), one line each."""
    f = alert.fields
    if alert.kind == "anomaly":
        return [one_line(line) for line in _anomaly_lines(alert)]
    if alert.kind == "reconciliation":
        lines = [
            f"Day: {f.get('date')} (UTC)  Provider: {f.get('provider')}  Connection: {f.get('connection_id')}",
            f"Reported: {human_usd(f.get('reported_usd'))} USD  Tracked: {human_usd(f.get('tracked_usd'))} USD",
            f"Difference: {human_usd(f.get('difference_usd'))} USD ({f.get('drift_pct')}%); "
            f"unattributed: {human_usd(f.get('unattributed_usd'))} USD",
            f"Alert: {alert.alert_id}",
        ]
        return [one_line(line) for line in lines]
    lines = [
        f"Scope: {_scope_text(f.get('scope'))}",
        f"Window: {f.get('window_start')} .. {f.get('window_end') or 'open'} ({f.get('timezone') or 'UTC'})",
        f"Spent: {human_usd(f.get('spent_usd'))} USD of {human_usd(f.get('limit_usd'))} USD ({f.get('percent_used')}%)",
    ]
    if alert.kind == "forecast":
        lines.append(
            f"Projected: {human_usd(f.get('projected_usd'))} USD; limit reached around {f.get('projected_at')}"
        )
    top = f.get("top") or []
    if top:
        lines.append(
            "Top spenders: "
            + ", ".join(f"{t.get('kind')} {t.get('name')} {human_usd(t.get('spent_usd'))} USD" for t in top)
        )
    lines.append(f"Event: {f.get('event_id')}  Alert: {alert.alert_id}")
    # a scope value or agent name with line breaks could otherwise forge lines such as "Spent: ..."
    return [one_line(line) for line in lines]


def _anomaly_lines(alert: Alert) -> list[str]:
    f = alert.fields
    a = f.get("anomaly") or {}
    kind = a.get("spike_type")
    why = {
        "volume": f"volume spike: {a.get('calls')} calls, {a.get('calls_ratio')}x the usual {a.get('usual_calls')}",
        "size": f"size spike: {a.get('tokens_per_call')} tokens per call, {a.get('size_ratio')}x the usual "
        f"{a.get('usual_tokens_per_call')}",
        "price_mix": f"price/mix shift: cost per token {a.get('price_ratio')}x the usual (a more expensive model)",
    }.get(kind, str(kind))
    models = ", ".join(
        f"{m.get('model')} {human_usd(m.get('excess_usd'))} USD ({round(100 * (m.get('share') or 0))}%)"
        for m in a.get("models") or []
    )
    return [
        f"Scope: {_scope_text(f.get('scope'))}",
        f"Window: {f.get('window_start')} .. {f.get('window_end')} (UTC); episode since {a.get('episode_start')}",
        f"Spent: {human_usd(f.get('spent_usd'))} USD in the window; usual for this hour: "
        f"{human_usd(f.get('limit_usd'))} USD (window ratio {a.get('window_ratio')}, score {a.get('score')})",
        f"Since the episode started: {human_usd(a.get('episode_usd'))} USD, usually "
        f"{human_usd(a.get('usual_episode_usd'))} USD: {a.get('ratio')}x",
        f"Why: {why}",
        f"Excess by model: {models or 'n/a'}",
        f"Example events: {', '.join(a.get('event_ids') or [])}  Alert: {alert.alert_id}",
    ]
