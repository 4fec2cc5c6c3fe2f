"""GET /v1/analytics/export: raw events or a breakdown as CSV, JSON, NDJSON or Parquet, streamed.

ClickHouse encodes the rows (CSV, JSONEachRow, Parquet with its own row groups) and this service
passes its response through chunk by chunk, so memory stays flat whatever the row count. JSON is
ClickHouse's NDJSON with the brackets and commas of an array added on the way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from clickhouse_connect.driver.exceptions import ClickHouseError
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from query_api.deps import CH, Reader
from query_api.errors import QueryFailed, clickhouse_message
from query_api.filters import Filters, Params
from query_api.insights_sql import focus_sql
from query_api.routers.analytics import (
    EVENT_COLUMNS,
    NEWEST_ROW,
    FiltersDep,
    breakdown_order,
    events_select,
    net_events_select,
)
from query_api.usage_sql import MEASURES, GroupBy, UsageQuery, build_usage_query

router = APIRouter(prefix="/v1/analytics", tags=["analytics"])

#: format -> (ClickHouse output format, media type, file extension)
FORMATS: dict[str, tuple[str, str, str]] = {
    "csv": ("CSV", "text/csv; charset=utf-8", "csv"),
    "json": ("JSONEachRow", "application/json", "json"),
    "ndjson": ("JSONEachRow", "application/x-ndjson", "ndjson"),
    "parquet": ("Parquet", "application/vnd.apache.parquet", "parquet"),
}
# exact money as a decimal (Decimal(38, 9) in Parquet, digits in text) next to integer nano-USD
_USD = "toDecimal128(cost_nanos, 9) / 1000000000"
_EXPORT_SETTINGS = {
    "output_format_json_quote_decimals": 1,  # money stays an exact string in JSON
    "output_format_json_quote_64bit_integers": 0,
    "output_format_parquet_compression_method": "zstd",
    # row groups of 100k rows, so readers (and ClickHouse while writing) hold a slice, not the file
    "output_format_parquet_row_group_size": 100_000,
}
#: an exported event: the API's event columns but the gateway's receive time (an ingestion detail)
EVENT_EXPORT_COLUMNS = tuple(c for c in EVENT_COLUMNS if c != "received_at")


def events_export_sql(
    filters: Filters, tenant: str, params: Params, corrections: bool = False
) -> tuple[str, list[str]]:
    """Events in their current state (one row each), or, with ``corrections``, every stored row:
    originals and re-pricing correction rows, told apart by ``correction_kind``."""
    if corrections:
        columns = (*EVENT_EXPORT_COLUMNS, "correction_id", "correction_kind")
        inner = events_select(filters, tenant, params, columns)
    else:
        columns = EVENT_EXPORT_COLUMNS
        inner = net_events_select(filters, tenant, params, columns)
    names = [
        "event_id",
        "timestamp",
        "cost_usd",
        *[c for c in columns if c not in ("event_id", "timestamp")],
    ]
    select = ", ".join(_USD + " AS cost_usd" if n == "cost_usd" else f"`{n}`" for n in names)
    order = "timestamp, event_id" + (f", {NEWEST_ROW}" if corrections else "")
    return f"SELECT {select} FROM ({inner}) ORDER BY {order}", names


def breakdown_export_sql(
    q: UsageQuery, tenant: str, order: str, limit: int | None
) -> tuple[str, dict[str, Any], list[str]]:
    built = build_usage_query(
        UsageQuery(q.filters, q.group, measures=tuple(MEASURES)), tenant, order_by=breakdown_order(order), limit=limit
    )
    key = q.group.dimension or f"tag_{q.group.tag_key}"
    measures = [m for m in MEASURES if m not in ("latency_ms_sum", "latency_count")]
    names = [key, "cost_usd", *measures, "avg_latency_ms"]
    select = ", ".join(
        [
            "group_key AS `key`",
            f"{_USD} AS cost_usd",
            *measures,
            "if(latency_count = 0, NULL, latency_ms_sum / latency_count) AS avg_latency_ms",
        ]
    )
    sql = f"SELECT {select} FROM ({built.sql})"
    return sql, built.params, ["key" if n == key else n for n in names]


def focus_export_sql(filters: Filters, tenant: str) -> tuple[str, dict[str, Any]]:
    q = UsageQuery(
        filters, granularity="day", split_by=("project", "agent", "provider", "model"),
        measures=("calls", "cost_nanos", "input_tokens", "output_tokens"),
    )  # fmt: skip
    built = build_usage_query(q, tenant)
    params = Params(dict(built.params))
    sql = focus_sql(
        built.sql, params.add(filters.tz.key, "String", "focus_tz"), params.add(tenant, "String", "account")
    )
    return sql, params.values


def _csv_header(names: list[str]) -> bytes:
    return (",".join('"' + n.replace('"', '""') + '"' for n in names) + "\n").encode()


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    async with stream:
        async for chunk in stream:
            yield chunk


async def _json_array(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """NDJSON in, one JSON array out; a chunk at a time, never the whole body."""
    yield b"["
    pending, first = b"", True
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        rows = [line for line in lines if line]
        if rows:
            yield (b"" if first else b",\n") + b",\n".join(rows)
            first = False
    if pending.strip():
        yield (b"" if first else b",\n") + pending
    yield b"]\n"


async def _with_prefix(prefix: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield prefix
    async for chunk in chunks:
        yield chunk


@router.get(
    "/export",
    summary="Download raw events or a breakdown (csv, json, ndjson, parquet), or FinOps FOCUS rows (focus), streamed",
    response_class=StreamingResponse,
    responses={200: {"content": {m: {} for _, m, _ in FORMATS.values()}}},
)
async def export(
    principal: Reader,
    ch: CH,
    filters: FiltersDep,
    format: Literal["csv", "json", "ndjson", "parquet", "focus"] = "csv",
    data: Annotated[Literal["events", "breakdown"], Query(description="raw events, or the breakdown `by`")] = "events",
    by: Annotated[str, Query(description="breakdown key: project|agent|user|provider|model|tag:<key>")] = "agent",
    order: Annotated[str, Query(description="breakdown order, as /breakdown")] = "-cost",
    limit: Annotated[int | None, Query(ge=1, description="breakdown rows (default all)")] = None,
    corrections: Annotated[
        bool,
        Query(
            description="events: false (default) one row per event in its current state after re-pricings, "
            "true every stored row incl. correction rows (with correction_id, correction_kind)"
        ),
    ] = False,
) -> StreamingResponse:
    ch_format, media_type, ext = FORMATS.get(format, ("CSVWithNames", "text/csv; charset=utf-8", "csv"))
    if format == "focus":  # FinOps FOCUS columns, per day, project, agent, provider and model (docs/insights.md)
        sql, parameters = focus_export_sql(filters, principal.tenant)
        data = "focus"
    elif data == "events":
        params = Params()
        sql, names = events_export_sql(filters, principal.tenant, params, corrections)
        parameters: dict[str, Any] = params.values
    else:
        sql, parameters, names = breakdown_export_sql(
            UsageQuery(filters, group=GroupBy.parse(by)), principal.tenant, order, limit
        )
    try:
        # opened before answering, so a failing query is a proper error response, not a cut stream
        settings = {**_EXPORT_SETTINGS, "optimize_aggregation_in_order": 1}  # the net events' GROUP BY streams
        stream = await ch.raw_stream(sql, parameters=parameters, settings=settings, fmt=ch_format)
    except ClickHouseError as exc:
        raise QueryFailed(clickhouse_message(exc)[1]) from None
    body = _chunks(stream)
    if format == "json":
        body = _json_array(body)
    elif format == "csv":
        body = _with_prefix(_csv_header(names), body)
    stamp = f"{filters.start:%Y%m%dT%H%M%SZ}-{filters.end:%Y%m%dT%H%M%SZ}"
    label = data if data in ("events", "focus") else "breakdown-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", by)
    filename = f"spendstream-{label}-{stamp}.{ext}"
    return StreamingResponse(
        body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )
