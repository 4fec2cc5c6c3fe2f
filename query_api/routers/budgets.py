"""Budgets: ``POST/GET /v1/budgets``, ``GET/PUT/DELETE /v1/budgets/{id}``, ``GET /v1/budgets/{id}/status``.

Stored in ClickHouse ``budgets`` (ReplacingMergeTree by version, ``deleted`` flag), the durable
source of truth: the budgets stage and the gateway's budget check re-read it every
``budgets.reload_s`` (1 s), so a change applies everywhere within about a second,
without restarts.

Status is computed from what ClickHouse stored (the sink's ``usage_minute`` aggregate, or
``usage_events`` for user and tag scopes, which the minute grain does not keep), for the window in
force now. It therefore also counts spend from before the budget existed; the stream's view
(``spendstream.budget.state``, what the alerts and the gateway's check use) starts counting when
the budget was created. The alerts already fired in the window come from ``budget_alerts``.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from query_api.deps import CH, Principal, require
from query_api.errors import InvalidField, NotFound
from spendstream.alerting import channel_refusal
from spendstream.budgets import (
    DEFAULT_THRESHOLDS,
    Budget,
    BudgetStanding,
    ScopeError,
    check_budget_name,
    check_timezone,
    current_window,
    parse_limit_nanos,
    parse_scope,
    parse_thresholds,
)
from spendstream.budgets.store import BUDGET_COLUMNS, budget_from_row, budget_row
from spendstream.contracts import BUDGET_WINDOWS, nanos_to_usd_str
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/budgets", tags=["budgets"])

Reader = Annotated[Principal, Depends(require("read"))]
Admin = Annotated[Principal, Depends(require("admin"))]

MAX_CHANNELS = 20
EMAIL_MARK = "@"


class BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    scope: dict[str, Any] = Field(
        default_factory=dict,
        description="any of project, agent, user, provider, model, tag ('key=value'); {} = the whole tenant",
    )
    window: Literal[BUDGET_WINDOWS] = Field(  # type: ignore[valid-type]
        description="daily, weekly, monthly (calendar, in `timezone`), rolling_1h, rolling_24h or total"
    )
    timezone: str = Field("UTC", description="IANA time zone of calendar windows, e.g. Europe/Berlin")
    limit_usd: str | int | float = Field(description='USD as a decimal string, e.g. "10.00"')
    thresholds: list[Any] = Field(default_factory=lambda: [int(t) for t in DEFAULT_THRESHOLDS],
                                  description="percents of the limit, 1..1000")  # fmt: skip
    forecast: bool = Field(True, description="alert once per window when the projection exceeds the limit")
    channels: list[str] = Field(default_factory=list, max_length=MAX_CHANNELS,
                                description="webhook ids and e-mail addresses")  # fmt: skip
    enforce: bool = Field(False, description="the budget check denies once the limit is reached")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_budget_name(v)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        return check_timezone(v)

    @field_validator("limit_usd")
    @classmethod
    def _limit(cls, v: str | int | float) -> str | int | float:
        parse_limit_nanos(v)
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[Any]) -> list[Any]:
        parse_thresholds(v)
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        for channel in v:
            if not channel.strip() or len(channel) > 256:
                raise ValueError("each channel is a webhook id or an e-mail address (1..256 characters)")
            # e-mail entries become recipients as they are: one plain address, no line breaks
            refusal = channel_refusal(channel.strip(" "))
            if refusal:
                raise ValueError(f"channel {channel!r}: {refusal}")
        return list(dict.fromkeys(c.strip() for c in v))

    def to_budget(self, tenant: str, budget_id: str) -> Budget:
        try:
            scope = parse_scope(self.scope)
        except ScopeError as exc:
            raise InvalidField(f"scope.{exc.field}", str(exc)) from None
        return Budget(
            tenant=tenant, id=budget_id, name=self.name.strip(), scope=scope, window=self.window,
            timezone=self.timezone, limit_nanos=parse_limit_nanos(self.limit_usd),
            thresholds=parse_thresholds(self.thresholds), forecast=self.forecast, channels=tuple(self.channels),
            enforce=self.enforce,
        )  # fmt: skip


def _percent(t: Decimal) -> int | float:
    # percents are not money: plain JSON numbers, integers where they are whole
    return int(t) if t == t.to_integral_value() else float(t)


def _view(b: Budget, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": b.id, "name": b.name, "scope": dict(b.scope), "window": b.window, "timezone": b.timezone,
        "limit_usd": nanos_to_usd_str(b.limit_nanos), "thresholds": [_percent(t) for t in b.thresholds],
        "forecast": b.forecast, "channels": list(b.channels), "enforce": b.enforce,
        "created_at": iso_utc(row["created_at"]), "updated_at": iso_utc(row["updated_at"]),
    }  # fmt: skip


async def _rows(ch: CH, tenant: str, budget_id: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM budgets FINAL WHERE tenant = {tenant:String} AND deleted = 0"
    params: dict[str, Any] = {"tenant": tenant}
    if budget_id is not None:
        sql += " AND id = {id:String}"
        params["id"] = budget_id
    result = await ch.query(sql + " ORDER BY created_at, id", parameters=params)
    return list(result.named_results())


async def _one(ch: CH, tenant: str, budget_id: str) -> dict[str, Any]:
    rows = await _rows(ch, tenant, budget_id)
    if not rows:
        raise NotFound(f"budget {budget_id!r}")
    return rows[0]


async def _check_channels(ch: CH, tenant: str, channels: tuple[str, ...]) -> None:
    """Webhook ids must name a live webhook of the tenant; e-mail addresses are taken as given."""
    ids = [c for c in channels if EMAIL_MARK not in c]
    if not ids:
        return
    result = await ch.query(
        "SELECT id FROM webhooks FINAL WHERE tenant = {tenant:String} AND deleted = 0 AND id IN {ids:Array(String)}",
        parameters={"tenant": tenant, "ids": ids},
    )
    missing = sorted(set(ids) - {r[0] for r in result.result_rows})
    if missing:
        raise InvalidField(
            "channels", f"unknown webhook id(s): {', '.join(missing)} (create them with POST /v1/webhooks)"
        )


async def _write(ch: CH, budget: Budget, created_at: datetime, version: int, deleted: bool = False) -> None:
    now = datetime.now(UTC)
    await ch.insert(
        "budgets", [budget_row(budget, created_at, now, version, deleted)], column_names=list(BUDGET_COLUMNS)
    )


def _next_version(previous: int = 0) -> int:
    return max(time.time_ns() // 1000, previous + 1)


@router.post("", status_code=201, summary="Create a budget (admin)")
async def create_budget(body: BudgetIn, principal: Admin, ch: CH) -> dict:
    budget = body.to_budget(principal.tenant, "bud_" + secrets.token_hex(8))
    await _check_channels(ch, principal.tenant, budget.channels)
    await _write(ch, budget, datetime.now(UTC), _next_version())
    row = await _one(ch, principal.tenant, budget.id)
    return _view(budget_from_row(row), row)


@router.get("", summary="Your budgets")
async def list_budgets(principal: Reader, ch: CH) -> dict:
    return {"budgets": [_view(budget_from_row(r), r) for r in await _rows(ch, principal.tenant)]}


@router.get("/{budget_id}", summary="One budget")
async def get_budget(budget_id: str, principal: Reader, ch: CH) -> dict:
    row = await _one(ch, principal.tenant, budget_id)
    return _view(budget_from_row(row), row)


@router.put("/{budget_id}", summary="Replace a budget (admin); the stream applies it within seconds")
async def replace_budget(budget_id: str, body: BudgetIn, principal: Admin, ch: CH) -> dict:
    old = await _one(ch, principal.tenant, budget_id)
    budget = body.to_budget(principal.tenant, budget_id)
    await _check_channels(ch, principal.tenant, budget.channels)
    await _write(ch, budget, old["created_at"], _next_version(old["version"]))
    row = await _one(ch, principal.tenant, budget_id)
    return _view(budget_from_row(row), row)


@router.delete("/{budget_id}", status_code=204, summary="Delete a budget (admin)")
async def delete_budget(budget_id: str, principal: Admin, ch: CH) -> Response:
    old = await _one(ch, principal.tenant, budget_id)
    await _write(ch, budget_from_row(old), old["created_at"], _next_version(old["version"]), deleted=True)
    return Response(status_code=204)


def _spend_query(budget: Budget, start_ms: int, end_ms: int | None) -> tuple[str, dict[str, Any]]:
    """SQL summing the budget's spend in [start, end) from the cheapest table that has its scope."""
    raw = "user" in budget.scope or "tag" in budget.scope
    table, column = ("usage_events", "timestamp") if raw else ("usage_minute", "bucket")
    where = ["tenant = {tenant:String}", f"{column} >= fromUnixTimestamp64Milli({{start:Int64}}, 'UTC')"]
    params: dict[str, Any] = {"tenant": budget.tenant, "start": start_ms}
    if end_ms is not None:
        where.append(f"{column} < fromUnixTimestamp64Milli({{end:Int64}}, 'UTC')")
        params["end"] = end_ms
    for name, value in budget.scope.items():
        if name == "tag":
            key, _, tag_value = value.partition("=")
            where.append("tags[{tag_key:String}] = {tag_value:String}")
            params |= {"tag_key": key, "tag_value": tag_value}
        else:
            where.append(f"`{name}` = {{{name}:String}}")
            params[name] = value
    return f"SELECT sum(toInt128(cost_nanos)) FROM {table} WHERE {' AND '.join(where)}", params


@router.get("/{budget_id}/status", summary="Spend in the current window (from ClickHouse) and its alerts")
async def budget_status(budget_id: str, principal: Reader, ch: CH) -> dict:
    row = await _one(ch, principal.tenant, budget_id)
    budget = budget_from_row(row)
    now_ms = time.time_ns() // 1_000_000
    start, end = current_window(budget, now_ms)
    sql, params = _spend_query(budget, start, end)
    spent = int((await ch.query(sql, parameters=params)).result_rows[0][0] or 0)
    alerts = await ch.query(
        "SELECT alert_id, kind, threshold, spent_nanos, fired_at, event_id FROM budget_alerts FINAL"
        " WHERE tenant = {tenant:String} AND budget_id = {id:String}"
        " AND window_start >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') ORDER BY fired_at, alert_id",
        parameters={"tenant": budget.tenant, "id": budget.id, "start": start},
    )
    standing = BudgetStanding(budget, start, end, spent)
    return {
        **standing.to_json(),
        "budget": _view(budget, row),
        "source": "clickhouse",
        "allowed": standing.allows(0),
        "alerts": [
            {"alert_id": a, "kind": k, "threshold": None if k == "forecast" else _percent(Decimal(t)),
             "spent_usd": nanos_to_usd_str(s), "fired_at": iso_utc(f), "event_id": e}
            for a, k, t, s, f, e in alerts.result_rows
        ],
    }  # fmt: skip
