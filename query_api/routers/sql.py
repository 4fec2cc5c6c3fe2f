"""POST /v1/sql: analysts' read-only SQL over the tenant-scoped views (see ``query_api.sqlguard``)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from query_api.deps import CH, Principal, Reader, SettingsDep
from query_api.errors import QueryFailed, QueryRefused, TooManyQueries, clickhouse_message
from query_api.sqlguard import TENANT_VIEWS, analysis_error, check_ast, check_query_tree, check_text
from spendstream.settings import QueryApiSettings, Settings

router = APIRouter(tags=["sql"])

#: ClickHouse error codes that mean "your statement was refused", not "it failed while running"
_REFUSAL_CODES = {62: "syntax", 164: "readonly", 60: "unknown table", 46: "unknown function", 497: "access"}
_TIMEOUT_CODES = {159, 160}  # TIMEOUT_EXCEEDED, TOO_SLOW
_TOO_MANY_ROWS_TO_READ, _TOO_MANY_BYTES_TO_READ, _RESULT_TOO_LARGE, _MEMORY = 158, 307, 396, 241
_LIMIT_CODES = {*_TIMEOUT_CODES, _TOO_MANY_ROWS_TO_READ, _TOO_MANY_BYTES_TO_READ, _RESULT_TOO_LARGE, _MEMORY}
_ERROR_NAME = re.compile(r"\(([A-Z_]{3,})\)$")
#: a slot frees when one of the tenant's statements ends, which is usually within a second
RETRY_AFTER_S = 1


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="one SELECT over the tenant views")
    format: Literal["json", "csv"] = "json"
    max_rows: int | None = Field(
        None,
        ge=1,
        description="return at most this many rows (`truncated` says when more existed; capped by the "
        "server's limit); without it a result over the server's row limit is refused",
    )


def tenant_database(database: str) -> str:
    return f"{database}_tenant"


def statement_settings(principal: Principal, settings: Settings) -> dict[str, Any]:
    """The ClickHouse settings of every request made for an analyst's statement, its checks included."""
    limits = settings.query_api
    # log_comment carries the tenant into the views' filter; readonly=1 makes ClickHouse refuse
    # writes and any change of settings (log_comment included) by the statement.
    return {
        "database": tenant_database(settings.clickhouse.database),
        "log_comment": principal.tenant,
        "readonly": 1,
        "max_execution_time": limits.sql_max_seconds,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": limits.sql_max_memory_bytes,
        "max_rows_to_read": limits.sql_max_rows_to_read,
        "max_bytes_to_read": limits.sql_max_bytes_to_read,
        "read_overflow_mode": "throw",
        "max_result_bytes": limits.sql_max_result_bytes,
        "result_overflow_mode": "throw",
        "max_threads": limits.sql_max_threads,
        # a limit passed mid-result must come back as an error, not as a cut-off stream
        "wait_end_of_query": 1,
    }


def result_settings(requested_rows: int | None, limits: QueryApiSettings) -> tuple[dict[str, Any], int]:
    """Settings bounding the statement's result, and the number of rows to return at most.

    A request's ``max_rows`` asks for the first rows: ClickHouse's ``limit`` cuts the result one
    row past them, so the response can say it was truncated. Without it the whole result must fit
    the server's limit, else ClickHouse refuses it rather than anyone silently losing rows.
    """
    if requested_rows is None:
        return {"max_result_rows": limits.sql_max_rows}, limits.sql_max_rows
    rows = min(requested_rows, limits.sql_max_rows)
    return {"limit": rows + 1, "max_result_rows": rows + 1}, rows


def _limit_exceeded(code: int, message: str, limits: QueryApiSettings) -> QueryFailed:
    if code in _TIMEOUT_CODES:
        return QueryFailed(f"the statement ran longer than the time limit ({limits.sql_max_seconds:g} s)")
    if code == _TOO_MANY_ROWS_TO_READ:
        return QueryFailed(
            f"the statement would read more than {limits.sql_max_rows_to_read:,} rows (the rows-to-read limit): "
            "narrow it down by time or project, or read an aggregate view such as usage_daily"
        )
    if code == _TOO_MANY_BYTES_TO_READ:
        return QueryFailed(
            f"the statement would read more than {limits.sql_max_bytes_to_read:,} bytes (the bytes-to-read limit): "
            "read fewer columns, narrow it down by time or project, or read an aggregate view"
        )
    if code == _MEMORY:
        return QueryFailed(
            f"the statement needs more than {limits.sql_max_memory_bytes:,} bytes of memory (the memory limit): "
            "group by fewer keys or aggregate a narrower range"
        )
    if "rows" in message:
        return QueryFailed(
            f"the result has more than {limits.sql_max_rows:,} rows (the result row limit): add LIMIT, "
            "or pass max_rows to get the first rows"
        )
    return QueryFailed(
        f"the result is larger than {limits.sql_max_result_bytes:,} bytes (the result size limit): "
        "select fewer columns or rows"
    )


def _as_query_error(
    exc: ClickHouseError, step: str | None, sql: str, limits: QueryApiSettings
) -> QueryRefused | QueryFailed:
    """``step`` names the check that was running, so its errors are refusals told in our words."""
    code, message = clickhouse_message(exc)
    if code in _LIMIT_CODES:
        return _limit_exceeded(code, message, limits)
    if step:
        name = _ERROR_NAME.search(message)
        reason = "syntax" if step == "parser" else "analysis"
        return QueryRefused(analysis_error(name.group(1) if name else None, message, sql), reason)
    # Running, the statement reads only the tenant views (the checks made sure), so what
    # ClickHouse says is about the analyst's own statement and rows.
    if code in _REFUSAL_CODES:
        return QueryRefused(message)
    return QueryFailed(message)


async def _ask(
    ch: CH,
    sql: str,
    settings: dict[str, Any],
    limits: QueryApiSettings,
    *,
    analyst_sql: str,
    step: str | None,
    parameters: dict | None = None,
    raw: bool = False,
) -> Any:
    if raw:
        # without use_database=False the client's own database (the raw tables') would override the
        # `database` setting, and the statement would be resolved against the raw tables
        call = ch.raw_query(sql, parameters=parameters, settings=settings, use_database=False)
    else:
        call = ch.query(sql, parameters=parameters, settings=settings)
    try:
        return await asyncio.wait_for(call, timeout=limits.sql_max_seconds + 5)
    except TimeoutError:
        # chDB cannot cancel a running query: the client gives up, the engine finishes on its own
        raise QueryFailed(f"the statement ran longer than the time limit ({limits.sql_max_seconds:g} s)") from None
    except OperationalError:
        raise  # ClickHouse unreachable: the app's handler answers 503
    except ClickHouseError as exc:
        raise _as_query_error(exc, step, analyst_sql, limits) from None


async def guarded_statement(
    ch: CH,
    sql: str,
    settings: dict[str, Any],
    tenant_db: str,
    foreign_databases: frozenset[str],
    limits: QueryApiSettings,
) -> str:
    """The canonical text of ``sql`` once ClickHouse's parse and analysis show it stays in the views.

    ``sql`` has passed ``check_text`` already; see ``query_api.sqlguard`` for the steps.
    """
    canonical = (
        await _ask(
            ch,
            "SELECT formatQuerySingleLine({sql:String})",
            settings,
            limits,
            parameters={"sql": sql},
            analyst_sql=sql,
            step="parser",
        )
    ).result_rows[0][0]
    ctes = check_text(canonical, tenant_db, foreign_databases)
    # A raw query without a format: the client appends no "FORMAT Native" of its own, so the tree
    # is exactly the analyst's statement (any FORMAT / INTO OUTFILE in it shows up as a node).
    # TabSeparated escapes newlines inside values, so each line is one node.
    ast = await _ask(ch, f"EXPLAIN AST {canonical}", settings, limits, analyst_sql=sql, step="parser", raw=True)
    check_ast(ast.decode("utf-8", "replace").splitlines(), tenant_db, ctes, foreign_databases)
    tree = await _ask(
        ch, f"EXPLAIN QUERY TREE {canonical}", settings, limits, analyst_sql=sql, step="analyzer", raw=True
    )
    check_query_tree(tree.decode("utf-8", "replace").splitlines(), tenant_db)
    return canonical


class TenantSlots:
    """How many statements each tenant runs at once in this process.

    Only the event loop's thread touches it, and nothing awaits between the check and the count,
    so no lock is needed.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._running: dict[str, int] = {}

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        running = self._running.get(tenant, 0)
        if running >= self.limit:
            raise TooManyQueries(
                f"this tenant already runs {running} SQL statements, the most it may run at once; retry when one ends",
                RETRY_AFTER_S,
            )
        self._running[tenant] = running + 1
        try:
            yield
        finally:
            left = self._running[tenant] - 1
            if left:
                self._running[tenant] = left
            else:
                del self._running[tenant]


def _tenant_slots(request: Request) -> TenantSlots:
    # made on first use, on the app's state: the slots belong to one app instance, like its clients
    state = request.app.state
    slots = getattr(state, "sql_slots", None)
    if slots is None:
        slots = state.sql_slots = TenantSlots(state.settings.query_api.sql_max_concurrent_per_tenant)
    return slots


@contextmanager
def _counting_refusals(counter: Any) -> Iterator[None]:
    try:
        yield
    except QueryRefused as exc:
        counter.labels(exc.reason).inc()
        raise


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
        "read aggregates with sum()/uniqMerge() and GROUP BY). One SELECT per request; no other tables or "
        "databases, no SETTINGS, FORMAT, table functions other than numbers()/generate_series()/values(), "
        "or dictionary functions. Refused statements get 400 with `error: query_refused` and the reason. "
        "Every statement runs under limits (time, memory, rows and bytes read, result rows and bytes, threads): "
        "passing one gets 400 with `error: query_failed` naming the limit. `max_rows` returns the first rows "
        "(`truncated` says when more existed). A tenant runs a few statements at once; more get 429 with "
        "Retry-After."
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
    tenant_db = tenant_database(settings.clickhouse.database)
    # the raw tables' database, refused as a qualifier anywhere (next to system & co.)
    foreign = frozenset({settings.clickhouse.database})
    with _counting_refusals(request.app.state.metrics.sql_refused):
        # before anything reaches ClickHouse: most hostile statements end here
        check_text(body.sql, tenant_db, foreign)
        with _tenant_slots(request).hold(principal.tenant):
            base = statement_settings(principal, settings)
            canonical = await guarded_statement(ch, body.sql, base, tenant_db, foreign, limits)
            bounds, max_rows = result_settings(body.max_rows, limits)
            result = await _ask(ch, canonical, base | bounds, limits, analyst_sql=body.sql, step=None)
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
    content = await asyncio.to_thread(_encode, payload)
    return Response(content, media_type="application/json", headers=headers)


def _encode(payload: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(payload, _json_default, orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        # orjson holds 64-bit integers only; an Int128 sum (the aggregates' cost columns) can be
        # wider, so those cells become exact decimal strings (the fast path stays untouched)
        payload["rows"] = [[_wide_ints_as_text(v) for v in row] for row in payload["rows"]]
        return orjson.dumps(payload, _json_default, orjson.OPT_NON_STR_KEYS)


def _wide_ints_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_wide_ints_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _wide_ints_as_text(v) for k, v in value.items()}
    return value
