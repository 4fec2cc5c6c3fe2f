"""Project mapping rules: ``POST/GET /v1/project-mappings``, ``GET/PUT/DELETE /v1/project-mappings/{id}`` (admin).

A rule ``{"pattern": "peakpaws-*", "project": "PeakPaws", "priority": 10, "field": "session_label"}``
gives events that arrive without a project (event API, OTLP) the project of the first rule, by
highest priority, whose glob pattern matches the event's ``session_label`` or ``agent``
(case-insensitive); ``*`` is a catch-all fallback. Semantics in spendstream/project_mappings.py.
Stored in ClickHouse ``project_mappings``; the gateway re-reads it every
``otel.project_mappings_reload_s`` (2 s), so a change applies within seconds, without restarts.
Events already stored keep their project.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from query_api.deps import CH, Principal, SettingsDep, require
from query_api.errors import Conflict, NotFound
from spendstream.project_mappings import COLUMNS, MAX_PATTERN_LEN, MAX_PRIORITY, TABLE
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/project-mappings", tags=["project mappings"])

Admin = Annotated[Principal, Depends(require("admin"))]


class MappingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(
        min_length=1,
        max_length=MAX_PATTERN_LEN,
        pattern=r"^[^\x00-\x1f]+$",
        description="glob: * any characters, ? one, [abc] one of; case-insensitive; '*' matches every event",
        examples=["peakpaws-*"],
    )
    project: str = Field(min_length=1, max_length=128, pattern=r"\S", examples=["PeakPaws"])
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="higher is tried first")
    field: Literal["session_label", "agent"] = Field("session_label", description="the event field matched")


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "pattern": row["pattern"],
        "project": row["project"],
        "priority": row["priority"],
        "field": row["field"],
        "created_at": iso_utc(row["created_at"]),
        "updated_at": iso_utc(row["updated_at"]),
    }


async def _rows(ch: CH, tenant: str, rule_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} FINAL WHERE tenant = {{tenant:String}} AND deleted = 0"
    params: dict[str, Any] = {"tenant": tenant}
    if rule_id is not None:
        sql += " AND id = {id:String}"
        params["id"] = rule_id
    result = await ch.query(sql + " ORDER BY priority DESC, created_at, id", parameters=params)
    return list(result.named_results())


async def _one(ch: CH, tenant: str, rule_id: str) -> dict[str, Any]:
    rows = await _rows(ch, tenant, rule_id)
    if not rows:
        raise NotFound(f"project mapping {rule_id!r}")
    return rows[0]


async def _write(
    ch: CH, tenant: str, rule_id: str, body: MappingIn, created_at: datetime, version: int, deleted: bool = False
) -> None:
    row = [tenant, rule_id, body.pattern, body.project.strip(), body.priority, body.field, created_at,
           datetime.now(UTC), int(deleted), version]  # fmt: skip
    await ch.insert(TABLE, [row], column_names=list(COLUMNS))


def _next_version(previous: int = 0) -> int:
    return max(time.time_ns() // 1000, previous + 1)


@router.post("", status_code=201, summary="Create a project mapping rule (admin)")
async def create_mapping(body: MappingIn, principal: Admin, ch: CH, settings: SettingsDep) -> dict:
    limit = settings.otel.max_project_mappings
    if len(await _rows(ch, principal.tenant)) >= limit:
        raise Conflict(f"a tenant may have at most {limit} project mapping rules", "pattern")
    rule_id = "pm_" + secrets.token_hex(8)
    await _write(ch, principal.tenant, rule_id, body, datetime.now(UTC), _next_version())
    return _view(await _one(ch, principal.tenant, rule_id))


@router.get("", summary="Your project mapping rules, in match order (admin)")
async def list_mappings(principal: Admin, ch: CH) -> dict:
    return {"project_mappings": [_view(r) for r in await _rows(ch, principal.tenant)]}


@router.get("/{rule_id}", summary="One project mapping rule (admin)")
async def get_mapping(rule_id: str, principal: Admin, ch: CH) -> dict:
    return _view(await _one(ch, principal.tenant, rule_id))


@router.put("/{rule_id}", summary="Replace a project mapping rule (admin); the gateway applies it within seconds")
async def replace_mapping(rule_id: str, body: MappingIn, principal: Admin, ch: CH) -> dict:
    old = await _one(ch, principal.tenant, rule_id)
    await _write(ch, principal.tenant, rule_id, body, old["created_at"], _next_version(old["version"]))
    return _view(await _one(ch, principal.tenant, rule_id))


@router.delete("/{rule_id}", status_code=204, summary="Delete a project mapping rule (admin)")
async def delete_mapping(rule_id: str, principal: Admin, ch: CH) -> Response:
    old = await _one(ch, principal.tenant, rule_id)
    body = MappingIn(pattern=old["pattern"], project=old["project"], priority=old["priority"], field=old["field"])
    await _write(ch, principal.tenant, rule_id, body, old["created_at"], _next_version(old["version"]), deleted=True)
    return Response(status_code=204)
