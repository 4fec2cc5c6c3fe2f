"""ClickHouse side of the collectors (sync clickhouse-connect client): report rows, run records,
watermarks. Tables in clickhouse/schema/0016_provider_reports.sql.

Replacement: every bucket a run collected is written whole with the run's ``version``; readers
take only each bucket's newest version (:data:`LATEST_USAGE` / :data:`LATEST_COSTS`), so a
re-collected bucket replaces its previous collection, groups that disappeared included.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from spendstream.collectors.model import Bucket, CostRow, UsageRow

USAGE_TABLE = "provider_usage_hourly"
COSTS_TABLE = "provider_costs_daily"
RUNS_TABLE = "collector_runs"
TABLES = {"usage": USAGE_TABLE, "costs": COSTS_TABLE}

_USAGE_FIELDS = [f.name for f in dataclasses.fields(UsageRow) if f.name != "provider"]
_COST_FIELDS = [f.name for f in dataclasses.fields(CostRow) if f.name != "provider"]
_PREFIX = ["tenant", "connection_id", "provider", "row_index"]
_SUFFIX = ["collected_at", "version"]
RUN_COLUMNS = [
    "tenant", "connection_id", "provider", "dataset", "run_id", "trigger", "started_at", "finished_at", "status",
    "window_start", "window_end", "watermark", "buckets", "rows", "pages", "retries", "error",
]  # fmt: skip


def latest(table: str) -> str:
    """A FROM source of ``table``'s current rows of tenant ``{tenant:String}``: each bucket's newest
    collection, of live connections only."""
    return (
        f"(SELECT * FROM {table} FINAL WHERE tenant = {{tenant:String}} "
        "AND connection_id IN (SELECT id FROM provider_connections FINAL WHERE tenant = {tenant:String}) "
        "AND (connection_id, bucket_start, version) IN "
        f"(SELECT connection_id, bucket_start, max(version) FROM {table} WHERE tenant = {{tenant:String}} "
        "GROUP BY connection_id, bucket_start))"
    )


def insert_buckets(
    client: Any, dataset: str, tenant: str, connection_id: str, provider: str, buckets: Iterable[Bucket], version: int
) -> int:
    """Write whole buckets (an empty bucket as one all-zero row); returns rows written."""
    table = TABLES[dataset]
    fields = _USAGE_FIELDS if dataset == "usage" else _COST_FIELDS
    row_type = UsageRow if dataset == "usage" else CostRow
    now = datetime.now(UTC)
    out = []
    for bucket in buckets:
        rows = bucket.rows or [_empty(row_type, provider, bucket)]
        for index, row in enumerate(rows):
            out.append([tenant, connection_id, provider, index, *(getattr(row, f) for f in fields), now, version])
    if out:
        # a retried identical block (same rows, same version) is dropped by the dedup window
        client.insert(table, out, column_names=_PREFIX + fields + _SUFFIX)
    return len(out)


def _empty(row_type: type, provider: str, bucket: Bucket) -> Any:
    if row_type is CostRow:
        return CostRow(provider, bucket.start, bucket.end, 0)
    return UsageRow(provider, bucket.start, bucket.end)


def watermark(client: Any, tenant: str, connection_id: str, dataset: str) -> datetime | None:
    rows = client.query(
        f"SELECT max(watermark), count() FROM {RUNS_TABLE} WHERE tenant = {{t:String}} AND connection_id = {{c:String}} "
        "AND dataset = {d:String} AND status = 'ok'",
        parameters={"t": tenant, "c": connection_id, "d": dataset},
    ).result_rows
    value, n = rows[0]
    if not n:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def new_run_id() -> str:
    return "run_" + uuid.uuid4().hex[:16]


def record_run(client: Any, run: dict[str, Any]) -> None:
    client.insert(RUNS_TABLE, [[run[c] for c in RUN_COLUMNS]], column_names=RUN_COLUMNS)


def history(client: Any, tenant: str, limit: int = 100, connection_id: str | None = None) -> list[dict[str, Any]]:
    where = "tenant = {t:String}" + (" AND connection_id = {c:String}" if connection_id else "")
    rows = client.query(
        f"SELECT {', '.join(RUN_COLUMNS[1:])} FROM {RUNS_TABLE} WHERE {where} ORDER BY started_at DESC, run_id LIMIT {int(limit)}",
        parameters={"t": tenant, "c": connection_id or ""},
    ).result_rows
    return [dict(zip(RUN_COLUMNS[1:], row)) for row in rows]
