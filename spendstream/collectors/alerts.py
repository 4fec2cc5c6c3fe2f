"""The ``reconciliation`` alert: a settled UTC day on which a provider's reported cost and
Spendstream's tracked cost differ by more than BOTH thresholds of the connection (default 5 % and
$1). Sent on ``spendstream.budget.alerts`` (contract in spendstream/contracts.py), so the notify
stage delivers it through the connection's channels like a budget alert, and recorded in
``budget_alerts``.

Once per (connection, day): the alert_id is stable per (connection, day) and a day whose alert is
already in ``budget_alerts`` is skipped. Sent before it is recorded (as the budgets stage does): a
crash between the two sends the same alert_id again, which notify delivers at most once.

A day is settled once it ended ``SETTLE`` ago (providers' cost reports lag by hours); days are
looked at from ``lookback`` back (the span the last runs re-collected), so each run judges about one
new day and backfilled history raises nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from spendstream.collectors.connections import OpenConnection
from spendstream.collectors.reconcile import query
from spendstream.collectors.windows import floor_to
from spendstream.money import NANOS_PER_USD

log = logging.getLogger(__name__)
SETTLE = timedelta(hours=24)
_MAX_PERCENT = Decimal("99999999999999")  # budget_alerts.percent_used is Decimal(18, 4)


def alert_id(connection_id: str, day: str) -> str:
    return "rc_" + hashlib.sha256(f"reconciliation|{connection_id}|{day}".encode()).hexdigest()[:32]


def _nanos(usd: str) -> int:
    return int(Decimal(usd) * NANOS_PER_USD)


def drift_alerts(connection: OpenConnection, days: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """The alert values for the connection's provider's ``days`` (reconcile's ``days`` totals)
    whose drift exceeds both thresholds. Pure."""
    out = []
    for d in days:
        if d["provider"] != connection.provider:
            continue
        reported, tracked = _nanos(d["reported_cost_usd"]), _nanos(d["tracked_cost_usd"])
        diff = reported - tracked
        pct = Decimal(d["drift_pct"]) if d["drift_pct"] is not None else None
        over_pct = pct is None or abs(pct) > connection.drift_threshold_pct
        if abs(diff) <= connection.drift_threshold_nanos or not over_pct:
            continue
        start = datetime.combine(date.fromisoformat(d["date"]), datetime.min.time(), UTC)
        stamp = now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.append({
            "v": 1, "alert_id": alert_id(connection.id, d["date"]), "kind": "reconciliation",
            "tenant": connection.tenant, "budget_id": connection.id, "budget_name": connection.name,
            "scope": {"provider": connection.provider}, "window": "daily", "timezone": "UTC",
            "window_start": start.isoformat().replace("+00:00", "Z"),
            "window_end": (start + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
            "threshold": str(connection.drift_threshold_pct), "spent_usd": d["reported_cost_usd"],
            "limit_usd": d["tracked_cost_usd"], "spent_nanos": reported, "limit_nanos": tracked,
            "percent_used": d["drift_pct"] if d["drift_pct"] is not None else "100.00",
            "projected_usd": None, "projected_nanos": None, "projected_at": None, "top": [], "event_id": "",
            "event_time": stamp, "channels": list(connection.channels), "created_at": stamp,
            "date": d["date"], "provider": connection.provider, "connection_id": connection.id,
            "reported_usd": d["reported_cost_usd"], "tracked_usd": d["tracked_cost_usd"],
            "difference_usd": d["difference_usd"], "drift_pct": d["drift_pct"],
            "unattributed_usd": d["unattributed_cost_usd"],
        })  # fmt: skip
    return out


def _history_row(alert: dict[str, Any], fired_at: datetime) -> list[Any]:
    percent = max(-_MAX_PERCENT, min(_MAX_PERCENT, Decimal(alert["percent_used"])))
    start = datetime.fromisoformat(alert["window_start"])
    return [
        alert["tenant"], alert["alert_id"], "reconciliation", alert["budget_id"], alert["budget_name"],
        alert["scope"], start, start + timedelta(days=1), Decimal(alert["threshold"]), alert["spent_nanos"],
        alert["limit_nanos"], percent, None, None, "", "[]", fired_at,
    ]  # fmt: skip


_HISTORY_COLUMNS = [
    "tenant", "alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end", "threshold",
    "spent_nanos", "limit_nanos", "percent_used", "projected_nanos", "projected_at", "event_id", "top", "fired_at",
]  # fmt: skip


def raise_drift_alerts(ch: Any, settings: Any, connection: OpenConnection, now: datetime | None = None) -> list[str]:
    """Judge the connection's settled days in the lookback span; send and record new alerts.
    Returns the alert ids sent."""
    from spendstream.topics import BUDGET_ALERTS

    now = now or datetime.now(UTC)
    lookback = timedelta(hours=settings.collectors.recollect_hours) + SETTLE
    start = floor_to(now - lookback, 86400)
    end = floor_to(now - SETTLE, 86400)  # days ending at or before now - SETTLE
    if end <= start:
        return []
    days = query(ch, connection.tenant, start, end, "model")["days"]
    alerts = drift_alerts(connection, days, now)
    if not alerts:
        return []
    known = {
        r[0]
        for r in ch.query(
            "SELECT alert_id FROM budget_alerts WHERE tenant = {t:String} AND alert_id IN {ids:Array(String)}",
            parameters={"t": connection.tenant, "ids": [a["alert_id"] for a in alerts]},
        ).result_rows
    }
    new = [a for a in alerts if a["alert_id"] not in known]
    if not new:
        return []
    asyncio.run(_produce(settings, BUDGET_ALERTS.name, new))
    ch.insert("budget_alerts", [_history_row(a, now) for a in new], column_names=_HISTORY_COLUMNS)
    for a in new:
        log.warning(
            "reconciliation alert %s: %s %s drift %s%%", a["alert_id"], a["provider"], a["date"], a["drift_pct"]
        )
    return [a["alert_id"] for a in new]


async def _produce(settings: Any, topic: str, alerts: list[dict[str, Any]]) -> None:
    from aiokafka import AIOKafkaProducer

    from spendstream.kafka import producer_kwargs

    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        for alert in alerts:
            await producer.send_and_wait(topic, orjson.dumps(alert), key=alert["alert_id"].encode())
    finally:
        await producer.stop()
