"""API keys of the caller's tenant (admin). The secret is shown once; revoked keys stop working at
the gateway at its next key reload (``gateway.key_cache_refresh_s``, 2 s by default)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from query_api.deps import Admin, KeysDep
from query_api.errors import InvalidField, NotFound
from spendstream.keys import InvalidKeyRequest, create_key, list_keys, revoke_key
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class KeyIn(BaseModel):
    scopes: list[str] = Field(min_length=1, description="any of ingest, read, admin")
    name: str = Field("", max_length=256)


def _view(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "tenant"}
    out["scopes"] = sorted(out["scopes"])
    for k in ("created_at", "revoked_at"):
        if out.get(k) is not None:
            out[k] = iso_utc(out[k])
    return out


@router.post("", status_code=201, summary="Create a key for your tenant; the response holds the secret, once")
async def create(body: KeyIn, principal: Admin, request: Request, keys: KeysDep) -> dict:
    try:
        key_id, key = await asyncio.to_thread(
            create_key, request.app.state.ch_sync, principal.tenant, body.scopes, body.name
        )
    except InvalidKeyRequest as exc:
        raise InvalidField("scopes", str(exc)) from None
    # usable here at once; the gateway learns it at its next reload (or on first use)
    await keys.reload()
    return {"id": key_id, "key": key, "tenant": principal.tenant, "scopes": sorted(body.scopes), "name": body.name}


@router.get("", summary="Your tenant's keys (never their secrets)")
async def list_(principal: Admin, request: Request) -> dict:
    rows = await asyncio.to_thread(list_keys, request.app.state.ch_sync, principal.tenant, True)
    return {"keys": [_view(r) for r in rows]}


@router.delete("/{key_id}", status_code=204, summary="Revoke a key")
async def revoke(key_id: str, principal: Admin, request: Request, keys: KeysDep) -> None:
    if not await asyncio.to_thread(revoke_key, request.app.state.ch_sync, key_id, principal.tenant):
        raise NotFound(f"live key {key_id!r}")
    # this service stops accepting it now; the gateway at its next reload
    await keys.reload()
