"""Wire formats between stages (value format v1). Pure: no IO imports.

usage.raw record
    key   = b"<tenant>/<project>"
    value = orjson {"v": 1, "tenant": str, "project": str, "received_at": RFC 3339 str,
                    "events": [NormalisedEvent, ...]}        # all events share tenant/project

    As the gateway publishes them: every event has event_id, timestamp, project, agent, provider,
    model, input_tokens, output_tokens and status; optional fields that are absent and token
    subsets that are 0 are left out (read them with ``.get(name, 0)``). An envelope may hold the
    events of several requests of the tenant that arrived together (the gateway coalesces them);
    ``received_at`` is then the first one's receive time.

usage.priced record (exactly one per usage.raw record, so replays after a crash are identical)
    key   = same as the raw record
    value = orjson {"v": 1, "tenant", "project", "received_at",
                    "src": {"partition": int, "offset": int},   # the usage.raw record it prices
                    "events": [PricedEvent, ...]}             # duplicates already removed

``src`` is a per-partition sequence number: usage.priced is co-partitioned with usage.raw and the
pricing stage handles one raw partition in order, so downstream stages drop any priced record
whose ``src.offset`` is not above the highest one they already applied for ``src.partition``.
That makes redelivery after a pricing crash a no-op without Kafka transactions (Tansu has none).

    headers (set by the pricing stage; optional for readers, which fall back to the value):
        spendstream-src-partition, spendstream-src-offset = ``src`` as ASCII decimals
        spendstream-events = len(events) as an ASCII decimal
    so a stage can apply the replay rule and size its batches without parsing the value.

usage.dlq record (one per input record, or per record's rejected events, a stage could not use)
    key   = the input record's key
    value = orjson {"v": 1, "stage": str, "reason": str,
                    "src": {"topic": str, "partition": int, "offset": int},
                    "value_b64": base64 of the input value       # the whole record was unusable
                    | "events": [{"reason": str, "event": ...}]}  # only these events were

Money is integer nano-USD (1e-9 USD) everywhere on the wire and in ClickHouse.
"""

from __future__ import annotations

import base64
import hashlib
from decimal import Decimal
from typing import Any, TypedDict

from spendstream.money import INT64_AMOUNT

SCHEMA_VERSION = 1

#: Token classes of contract v1. input_tokens INCLUDES cache read/write and audio input;
#: output_tokens INCLUDES reasoning and audio output (OpenTelemetry GenAI convention).
TOKEN_FIELDS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
)
#: subset -> the count it is part of (a subset larger than its parent is rejected)
TOKEN_PARENTS: dict[str, str] = {
    "cache_read_tokens": "input_tokens",
    "cache_write_tokens": "input_tokens",
    "cache_write_1h_tokens": "cache_write_tokens",
    "reasoning_tokens": "output_tokens",
    "input_audio_tokens": "input_tokens",
    "output_audio_tokens": "output_tokens",
}

#: cost breakdown keys of a priced event (nano-USD each); total is their sum
COST_CLASSES: tuple[str, ...] = (
    "input",
    "output",
    "cache_read",
    "cache_write",
    "reasoning",
    "input_audio",
    "output_audio",
    "request",
)

PRICING_STATUSES = ("priced", "unknown_model", "client", "cost_over_cap")
PRICE_SOURCES = ("catalog", "override", "client", "none")


class NormalisedEvent(TypedDict, total=False):
    event_id: str
    timestamp: str  # RFC 3339, UTC, millisecond precision, "Z"
    project: str
    agent: str
    user: str
    session_id: str
    session_label: str
    session_type: str  # "main", "subagent", "heartbeat" or any short string
    operation: str
    tags: dict[str, str]
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    reasoning_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    cost_usd: str | None  # client price as a decimal string
    latency_ms: int | None
    status: str  # "ok" | "error"


class PricedEvent(NormalisedEvent, total=False):
    cost_nanos: int  # total, nano-USD
    cost: dict[str, int]  # COST_CLASSES -> nano-USD
    price_id: str  # which price row was used (catalog provider/model@start or override id)
    pricing_status: str  # PRICING_STATUSES
    price_source: str  # PRICE_SOURCES


def record_key(tenant: str, project: str) -> bytes:
    return f"{tenant}/{project}".encode()


def usd_to_nanos(value: Decimal | str | int) -> int:
    """Exact conversion, rounding half-to-even below one nano-USD (documented, never float).

    Inputs go through the one money parser (spendstream/money.py): bounded length and exponent,
    ``MoneyError`` (a ValueError) for anything that is not a decimal amount within Int64 nano-USD.
    Fields with their own range use their ``MoneyRule`` instead."""
    return INT64_AMOUNT.nanos(value)


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


def nanos_to_usd_str(nanos: int) -> str:
    """Decimal string with 9 fractional digits, e.g. 1234 -> '0.000001234'."""
    return f"{nanos_to_usd(nanos):.9f}"


def raw_envelope(tenant: str, project: str, received_at: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "tenant": tenant, "project": project, "received_at": received_at, "events": events}


def priced_envelope(raw: dict[str, Any], partition: int, offset: int, events: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION,
        "tenant": raw["tenant"],
        "project": raw["project"],
        "received_at": raw["received_at"],
        "src": {"partition": partition, "offset": offset},
        "events": events,
    }


#: Kafka header names of a usage.priced record (see the module docstring)
PRICED_SRC_PARTITION_HEADER = "spendstream-src-partition"
PRICED_SRC_OFFSET_HEADER = "spendstream-src-offset"
PRICED_EVENTS_HEADER = "spendstream-events"


def priced_headers(src_partition: int, src_offset: int, events: int) -> list[tuple[str, bytes]]:
    return [
        (PRICED_SRC_PARTITION_HEADER, b"%d" % src_partition),
        (PRICED_SRC_OFFSET_HEADER, b"%d" % src_offset),
        (PRICED_EVENTS_HEADER, b"%d" % events),
    ]


def dlq_envelope(
    stage: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    *,
    value: bytes | None = None,
    events: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "stage": stage,
        "reason": reason,
        "src": {"topic": topic, "partition": partition, "offset": offset},
    }
    if events is not None:
        out["events"] = events
    else:
        out["value_b64"] = base64.b64encode(value or b"").decode()
    return out


# --- budget alerts ------------------------------------------------------------------------------
# Produced by the budgets stage (issue 6 part A), consumed by the notify stage (part B).
#
# spendstream.budget.alerts record
#     key   = alert_id (utf-8)
#     value = orjson {
#         "v": 1,
#         "alert_id": str,        # budget_alert_id(): stable per (budget, window start, threshold
#                                 # or "forecast"); the SAME alert may be sent again (see below)
#         "kind": "threshold" | "forecast",
#         "tenant": str,
#         "budget_id": str, "budget_name": str,
#         "scope": {"project"?, "agent"?, "user"?, "provider"?, "model"?, "tag"?: "key=value"},
#                                 # only the set fields; {} = the whole tenant
#         "window": "daily"|"weekly"|"monthly"|"rolling_1h"|"rolling_24h"|"total",
#         "timezone": IANA name,
#         "window_start": RFC 3339 UTC,   # rolling windows: crossing minute's end - window length
#         "window_end": RFC 3339 UTC | null,   # null for "total"
#         "threshold": decimal str (percent, e.g. "80") | null for forecast,
#         "spent_usd": decimal str, "limit_usd": decimal str,   # 9 fractional digits
#         "spent_nanos": int, "limit_nanos": int,
#         "percent_used": decimal str (2 fractional digits, rounded down),
#         "projected_usd": decimal str | null, "projected_nanos": int | null,  # forecast: projected
#                                 # end-of-window spend; threshold alerts: null
#         "projected_at": RFC 3339 UTC | null,   # forecast: expected time the limit is crossed
#         "top": [{"kind": "agent"|"model", "name": str, "spent_usd": str}, ...],
#                                 # up to 3 agents then up to 3 models (name = "provider/model"),
#                                 # by spend in the window at the crossing, highest first
#         "event_id": str,        # the event that crossed it (forecast: the event that triggered it)
#         "event_time": RFC 3339 UTC,     # that event's timestamp
#         "channels": [webhook id | e-mail address, ...],   # the budget's channels at the time
#         "created_at": RFC 3339 UTC,     # when the budgets stage emitted it
#     }
#
# Delivery guarantee: at least once, deduplicated by alert_id. The budgets stage sends the alert
# (and waits for the ack) BEFORE it records the threshold as fired in its state; a crash between
# the two sends the same alert again with the same alert_id (figures are recomputed from the
# same input, so they are equal). Consumers (notify) must deliver each alert_id at most once
# per channel: the generic webhook's idempotency key and PagerDuty's dedup_key are the alert_id.
#
# spendstream.budget.state record (compacted; read by the gateway's budget check)
#     key   = "<budget_id>|<window_start_ms>" (calendar and total windows; total starts at 0)
#             | "<budget_id>|rolling" (rolling windows)
#     value = orjson {"v": 1, "tenant", "budget_id", "window", "timezone", "limit_nanos",
#                     "window_start": ms, "window_end": ms | null, "spent_nanos": int,
#                     "updated_at": ms,
#                     "buckets": [[minute_start_ms, nanos], ...]}   # rolling windows only
#
# spendstream.budget.deltas record (internal to the budgets stage: usage.priced repartitioned)
#     key   = budget_id
#     value = orjson {"v": 1, "tenant", "budget_id", "src": {"partition": usage.raw partition},
#                     "records": [[raw offset, [[event_id, ts_ms, cost_nanos, agent,
#                                               "provider/model"], ...]], ...]}
#
# History: the budgets stage also writes every alert to ClickHouse `budget_alerts` (after the
# topic ack; ReplacingMergeTree by (tenant, alert_id) collapses re-sends). `scope` there is the
# same flat map; `top` is the JSON of the list above. notify only writes `alert_deliveries`.

#: "anomaly": a spend anomaly (the anomaly stage, spendstream/anomaly/alerts.py): the same fields, read
#: as that module says, plus "anomaly": its explanation
#
# kind "reconciliation" (the collectors, spendstream/collectors/alerts.py): a UTC day on which a
# provider's reported cost and Spendstream's tracked cost differ by more than both thresholds of
# a provider connection. alert_id = "rc_" + 32 hex, stable per (connection, day): sent once.
# The fields above read: budget_id/budget_name = the connection's id/name, scope = {"provider"},
# window "daily" [window_start, window_end) = the day (UTC), threshold = the connection's drift %,
# spent_* = reported, limit_* = tracked, percent_used = drift % (signed), top [], event_id "";
# plus "date", "provider", "connection_id", "reported_usd", "tracked_usd", "difference_usd"
# (reported - tracked), "drift_pct" (difference / reported, 2 places) and "unattributed_usd".
BUDGET_ALERT_KINDS = ("threshold", "forecast", "anomaly", "reconciliation")
BUDGET_WINDOWS = ("daily", "weekly", "monthly", "rolling_1h", "rolling_24h", "total")
BUDGET_SCOPE_FIELDS = ("project", "agent", "user", "provider", "model", "tag")


def budget_alert_id(budget_id: str, window_start_ms: int, threshold: str) -> str:
    """Stable id of the alert for one (budget, window start, threshold label). The budgets stage
    labels thresholds "<percent>@<limit_nanos>" (a threshold re-armed by a new limit is a new
    alert) and forecasts "forecast"."""
    digest = hashlib.sha256(f"{budget_id}|{window_start_ms}|{threshold}".encode()).hexdigest()
    return f"al_{digest[:32]}"
