"""Projects of a tenant: the values events carry in ``project``, with a name and description."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from query_api.deps import CH, Admin, Reader
from query_api.errors import Conflict, NotFound
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/projects", tags=["projects"])

_COLUMNS = ("id", "name", "description", "created_at", "updated_at")


class ProjectIn(BaseModel):
    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
        description="the value events send as `project` (letters, digits, '_', '.', ':', '-')",
    )
    name: str = Field("", max_length=256, description="display name; defaults to the id")
    description: str = Field("", max_length=2000)


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "created_at": iso_utc(row["created_at"]), "updated_at": iso_utc(row["updated_at"])}


async def _find(ch: CH, tenant: str, project_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(_COLUMNS)} FROM projects FINAL WHERE tenant = {{tenant:String}}"
    params: dict[str, Any] = {"tenant": tenant}
    if project_id is not None:
        sql += " AND id = {id:String}"
        params["id"] = project_id
    result = await ch.query(sql + " ORDER BY id", parameters=params)
    return [_view(r) for r in result.named_results()]


@router.post("", status_code=201, summary="Create a project (admin)")
async def create_project(body: ProjectIn, principal: Admin, ch: CH) -> dict:
    if await _find(ch, principal.tenant, body.id):
        raise Conflict(f"project {body.id!r} already exists", "id")
    now = datetime.now(UTC)
    row = [principal.tenant, body.id, body.name or body.id, body.description, now, now, 0, int(now.timestamp() * 1e6)]
    await ch.insert(
        "projects",
        [row],
        column_names=["tenant", "id", "name", "description", "created_at", "updated_at", "deleted", "version"],
    )
    return (await _find(ch, principal.tenant, body.id))[0]


@router.get("", summary="Your projects")
async def list_projects(principal: Reader, ch: CH) -> dict:
    return {"projects": await _find(ch, principal.tenant)}


@router.get("/{project_id}", summary="One project")
async def get_project(project_id: str, principal: Reader, ch: CH) -> dict:
    found = await _find(ch, principal.tenant, project_id)
    if not found:
        raise NotFound(f"project {project_id!r}")
    return found[0]
