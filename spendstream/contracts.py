"""Wire formats between stages (value format v1). Pure: no IO imports.

usage.raw record
    key   = b"<tenant>/<project>"
    value = orjson {"v": 1, "tenant": str, "project": str, "received_at": RFC 3339 str,
                    "events": [NormalisedEvent, ...]}        # all events share tenant/project

usage.priced record (exactly one per usage.raw record, so replays after a crash are identical)
    key   = same as the raw record
    value = orjson {"v": 1, "tenant", "project", "received_at",
                    "src": {"partition": int, "offset": int},   # the usage.raw record it prices
                    "events": [PricedEvent, ...]}             # duplicates already removed

``src`` is a per-partition sequence number: usage.priced is co-partitioned with usage.raw and the
pricing stage handles one raw partition in order, so downstream stages drop any priced record
whose ``src.offset`` is not above the highest one they already applied for ``src.partition``.
That makes redelivery after a pricing crash a no-op without Kafka transactions (Tansu has none).

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
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, TypedDict

SCHEMA_VERSION = 1
NANOS_PER_USD = 1_000_000_000

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

PRICING_STATUSES = ("priced", "unknown_model", "client")
PRICE_SOURCES = ("catalog", "override", "client", "none")


class NormalisedEvent(TypedDict, total=False):
    event_id: str
    timestamp: str  # RFC 3339, UTC, millisecond precision, "Z"
    project: str
    agent: str
    user: str
    session_id: str
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
    """Exact conversion, rounding half-to-even below one nano-USD (documented, never float)."""
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    return int((d * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


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
