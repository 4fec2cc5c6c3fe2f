"""POST /v1/sql: analysts' read-only SQL over the tenant-scoped views (see ``query_api.sqlguard``)."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from query_api.deps import CH, Principal, Reader, SettingsDep
from query_api.errors import QueryFailed, QueryRefused, clickhouse_message
from query_api.sqlguard import TENANT_VIEWS, check_ast, check_query_tree

router = APIRouter(tags=["sql"])

#: ClickHouse error codes that mean "your statement was refused", not "it failed while running"
_REFUSAL_CODES = {62: "syntax", 164: "readonly", 60: "unknown table", 46: "unknown function", 497: "access"}
_TIMEOUT_CODES = {159, 160}  # TIMEOUT_EXCEEDED, TOO_SLOW


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="one SELECT over the tenant views")
    format: Literal["json", "csv"] = "json"
    max_rows: int | None = Field(None, ge=1, description="at most this many rows (capped by the server's limit)")


def tenant_database(database: str) -> str:
    return f"{database}_tenant"


def _run_settings(principal: Principal, database: str, max_seconds: float) -> dict[str, Any]:
    # log_comment carries the tenant into the views' filter; readonly=1 makes ClickHouse refuse
    # writes and any change of settings (log_comment included) by the statement.
    return {
        "database": tenant_database(database),
        "log_comment": principal.tenant,
        "readonly": 1,
        "max_execution_time": max_seconds,
        "timeout_overflow_mode": "throw",
    }


def _as_query_error(exc: ClickHouseError, step: str | None) -> QueryRefused | QueryFailed:
    """``step`` names the check that was running, so its errors are refusals."""
    code, message = clickhouse_message(exc)
    if code in _TIMEOUT_CODES:
        return QueryFailed(f"the statement ran longer than the time limit: {message}")
    if step:
        return QueryRefused(f"refused by ClickHouse's {step}: {message}")
    if code in _REFUSAL_CODES:
        return QueryRefused(message)
    return QueryFailed(message)


async def _ask(
    ch: CH, sql: str, settings: dict[str, Any], parameters: dict | None = None, *, step: str | None = None
) -> Any:
    try:
        return await ch.query(sql, parameters=parameters, settings=settings)
    except ClickHouseError as exc:
        raise _as_query_error(exc, step) from None


async def _explain_ast(ch: CH, canonical: str, settings: dict[str, Any]) -> list[str]:
    # A raw query without a format: the client appends no "FORMAT Native" of its own, so the tree
    # is exactly the analyst's statement (any FORMAT / INTO OUTFILE in it shows up as a node).
    # TabSeparated escapes newlines inside values, so each line is one node.
    try:
        body = await ch.raw_query(f"EXPLAIN AST {canonical}", settings=settings)
    except ClickHouseError as exc:
        raise _as_query_error(exc, "parser") from None
    return body.decode("utf-8", "replace").splitlines()


async def guarded_statement(ch: CH, sql: str, run: dict[str, Any], tenant_db: str, refused_counter: Any) -> str:
    """The canonical text of ``sql`` once ClickHouse's parse and analysis show it stays in the views."""
    # ClickHouse refuses EXPLAIN subqueries under readonly=1; readonly=2 still refuses writes, and
    # the statement cannot change settings here because a SETTINGS clause fails check_ast first.
    settings = run | {"readonly": 2}
    try:
        canonical = (
            await _ask(ch, "SELECT formatQuerySingleLine({sql:String})", settings, {"sql": sql}, step="parser")
        ).result_rows[0][0]
        check_ast(await _explain_ast(ch, canonical, settings), tenant_db)
        # a SELECT from here on: as a subquery, EXPLAIN's rows come back like any result
        tree = await _ask(ch, f"SELECT explain FROM (EXPLAIN QUERY TREE {canonical})", settings, step="analyzer")
        check_query_tree([r[0] for r in tree.result_rows], tenant_db)
    except QueryRefused as exc:
        refused_counter.labels(exc.reason).inc()
        raise
    return canonical


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _csv_text(columns: list[str], rows: list) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_csv_cell(v) for v in row] for row in rows)
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return orjson.dumps(value, default=_json_default).decode()
    return value


@router.post(
    "/v1/sql",
    summary="Run one read-only SELECT over your tenant's views",
    description=(
        "Analysts' SQL. Tables: " + ", ".join(sorted(TENANT_VIEWS)) + " (each shows only your tenant's rows; "
        "read aggregates with sum()/uniqMerge() and GROUP BY). One SELECT per request; no SETTINGS, FORMAT, "
        "table functions other than numbers()/zeros()/generate_series()/values(), or dictionary functions. "
        "At most `max_rows` rows (`truncated` says when more existed) and a time limit. "
        "Refused statements get 400 with `error: query_refused` and the reason."
    ),
)
async def run_sql(
    body: SqlRequest,
    request: Request,
    principal: Reader,
    ch: CH,
    settings: SettingsDep,
) -> Response:
    limits = settings.query_api
    max_rows = min(body.max_rows or limits.sql_max_rows, limits.sql_max_rows)
    run = _run_settings(principal, settings.clickhouse.database, limits.sql_max_seconds)
    tenant_db = tenant_database(settings.clickhouse.database)
    canonical = await guarded_statement(ch, body.sql, run, tenant_db, request.app.state.metrics.sql_refused)
    # 'break' stops reading once the limit is passed; one row more tells whether rows were cut
    run |= {"max_result_rows": max_rows + 1, "result_overflow_mode": "break"}
    try:
        result = await asyncio.wait_for(
            _ask(ch, canonical, run), timeout=limits.sql_max_seconds + 5
        )
    except TimeoutError:
        # chDB cannot cancel a running query: the client gives up, the engine finishes on its own
        raise QueryFailed(f"the statement ran longer than {limits.sql_max_seconds:g} s") from None
    rows = result.result_rows[:max_rows]
    truncated = len(result.result_rows) > max_rows
    headers = {"X-Spendstream-Truncated": "true" if truncated else "false"}
    if body.format == "csv":
        # up to sql_max_rows rows: encoded in a worker thread, off the event loop
        text = await asyncio.to_thread(_csv_text, list(result.column_names), rows)
        return Response(text, media_type="text/csv; charset=utf-8", headers=headers)
    payload = {
        "columns": [{"name": n, "type": t.name} for n, t in zip(result.column_names, result.column_types)],
        "rows": rows,
        "row_count": len(rows),
        "truncated": truncated,
        "statement": canonical,
    }
    content = await asyncio.to_thread(orjson.dumps, payload, _json_default, orjson.OPT_NON_STR_KEYS)
    return Response(content, media_type="application/json", headers=headers)
