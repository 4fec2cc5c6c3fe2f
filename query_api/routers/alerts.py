"""Alert history of a tenant with the delivery state of each channel, newest first.

Alerts come from ``budget_alerts`` (written by the budgets stage, and by the anomaly stage for
kind "anomaly", whose explanation is ``details``), deliveries from
``alert_deliveries`` (every attempt, written by the notify stage); both are read through their
replacing keys, so a record written twice after a restart counts once.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query

from query_api.deps import CH, Principal, require
from query_api.filters import parse_instant
from query_api.logic import decode_cursor, encode_cursor
from spendstream.alerting import DELIVERED, FAILED
from spendstream.contracts import nanos_to_usd_str
from spendstream.timeutil import epoch_ms, iso_utc

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

Reader = Annotated[Principal, Depends(require("read"))]
UTC_ZONE = ZoneInfo("UTC")

_ALERT_SQL = """
SELECT alert_id, kind, budget_id, budget_name, scope, window_start, window_end, threshold, spent_nanos,
       limit_nanos, percent_used, projected_nanos, projected_at, event_id, top, fired_at, details
FROM budget_alerts FINAL
WHERE tenant = {tenant:String}"""

_DELIVERY_SQL = """
SELECT alert_id, channel, argMax(format, attempt) AS last_format, max(attempt) AS attempts,
       argMax(outcome, attempt) AS last_outcome, argMax(http_status, attempt) AS last_http_status,
       argMax(error, attempt) AS last_error, max(attempted_at) AS last_attempt_at,
       minIf(attempted_at, outcome = 'delivered') AS delivered_at
FROM alert_deliveries
WHERE tenant = {tenant:String} AND alert_id IN {ids:Array(String)}
GROUP BY alert_id, channel
ORDER BY alert_id, channel"""


def _decimal_text(d: Decimal) -> str:
    """80.000 -> '80', 81.2500 -> '81.25' (exact)."""
    text = f"{d:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def delivery_status(outcomes: list[str]) -> str:
    """One word for an alert: none (no channel tried yet), retrying (some channel will be tried
    again), delivered (every channel), failed (none), partial (some delivered, others gave up)."""
    if not outcomes:
        return "none"
    if FAILED in outcomes:
        return "retrying"
    delivered = outcomes.count(DELIVERED)
    if delivered == len(outcomes):
        return "delivered"
    return "partial" if delivered else "failed"


def _alert_view(row: dict[str, Any], deliveries: list[dict[str, Any]]) -> dict[str, Any]:
    forecast = row["kind"] == "forecast"
    try:
        top = json.loads(row["top"]) if row["top"] else []
    except ValueError:
        top = row["top"]
    return {
        "alert_id": row["alert_id"],
        "kind": row["kind"],
        "budget_id": row["budget_id"],
        "budget_name": row["budget_name"],
        "scope": dict(row["scope"]),
        "window_start": iso_utc(row["window_start"]),
        "window_end": iso_utc(row["window_end"]),
        # forecasts and anomalies have no threshold (stored as 0)
        "threshold": None if forecast or row["kind"] == "anomaly" else _decimal_text(row["threshold"]),
        "spent_usd": nanos_to_usd_str(row["spent_nanos"]),
        "limit_usd": nanos_to_usd_str(row["limit_nanos"]),
        "percent_used": _decimal_text(row["percent_used"]),
        "projected_usd": None if row["projected_nanos"] is None else nanos_to_usd_str(row["projected_nanos"]),
        "projected_at": iso_utc(row["projected_at"]),
        "top": top,
        "event_id": row["event_id"],
        "fired_at": iso_utc(row["fired_at"]),
        "delivery_status": delivery_status([d["outcome"] for d in deliveries]),
        "deliveries": deliveries,
        **({"anomaly": _details(row["details"])} if row["kind"] == "anomaly" else {}),
    }


def _details(text: str) -> Any:
    """An anomaly alert's explanation (spendstream/anomaly/alerts.py ``details``)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "channel": row["channel"],
        "format": row["last_format"],
        "outcome": row["last_outcome"],
        "attempts": int(row["attempts"]),
        "http_status": row["last_http_status"],
        "error": row["last_error"],
        "last_attempt_at": iso_utc(row["last_attempt_at"]),
        # minIf over no delivered row gives the epoch, not NULL
        "delivered_at": iso_utc(row["delivered_at"]) if row["last_outcome"] == DELIVERED else None,
    }


@router.get("", summary="Alert history with delivery status, newest first, with keyset pagination")
async def list_alerts(
    principal: Reader,
    ch: CH,
    budget_id: Annotated[str | None, Query(description="only this budget's alerts")] = None,
    kind: Annotated[
        Literal["threshold", "forecast", "anomaly"] | None, Query(description="only alerts of this kind")
    ] = None,
    from_: Annotated[
        str | None, Query(alias="from", description="fired at or after (RFC 3339 or YYYY-MM-DD, UTC)")
    ] = None,
    to: Annotated[
        str | None, Query(description="fired before (RFC 3339, or YYYY-MM-DD: up to that day's end, UTC)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict:
    sql = _ALERT_SQL
    # one extra row says whether another page exists
    params: dict[str, Any] = {"tenant": principal.tenant, "limit": limit + 1}
    if budget_id is not None:
        sql += " AND budget_id = {budget_id:String}"
        params["budget_id"] = budget_id
    if kind is not None:
        sql += " AND kind = {kind:String}"
        params["kind"] = kind
    if from_ is not None:
        sql += " AND fired_at >= {from_:DateTime64(3, 'UTC')}"
        params["from_"] = parse_instant("from", from_, UTC_ZONE, end_of_day=False)
    if to is not None:
        sql += " AND fired_at < {to:DateTime64(3, 'UTC')}"
        params["to"] = parse_instant("to", to, UTC_ZONE, end_of_day=True)
    if cursor:
        params["cursor_ms"], params["cursor_id"] = decode_cursor(cursor)
        sql += " AND (fired_at, alert_id) < (fromUnixTimestamp64Milli({cursor_ms:Int64}, 'UTC'), {cursor_id:String})"
    sql += " ORDER BY fired_at DESC, alert_id DESC LIMIT {limit:UInt32}"
    rows = list((await ch.query(sql, parameters=params)).named_results())
    alerts, more = rows[:limit], len(rows) > limit
    by_alert: dict[str, list[dict[str, Any]]] = {a["alert_id"]: [] for a in alerts}
    if alerts:
        result = await ch.query(_DELIVERY_SQL, parameters={"tenant": principal.tenant, "ids": list(by_alert)})
        for row in result.named_results():
            by_alert[row["alert_id"]].append(_delivery_view(row))
    next_cursor = encode_cursor(epoch_ms(alerts[-1]["fired_at"]), alerts[-1]["alert_id"]) if more else None
    return {"alerts": [_alert_view(a, by_alert[a["alert_id"]]) for a in alerts], "next_cursor": next_cursor}
