"""API keys of the caller's tenant. The secret is shown once; revoked keys stop working at the
gateway at its next key reload (``gateway.key_cache_refresh_s``, 2 s by default).

Each route takes the ``admin`` or the ``keys`` scope. With ``admin`` every key of the tenant is
yours to list and revoke; with only ``keys`` (the member role, or a key given that scope) you
see and revoke the keys you created, and create keys with the ``ingest`` and ``read`` scopes
only. Who created a key is recorded in ``api_key_owners``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from query_api.deps import KeyManager, KeysDep, Principal
from query_api.errors import Forbidden, InvalidField, NotFound
from spendstream.identity import store
from spendstream.keys import InvalidKeyRequest, create_key, list_keys, parse_scopes, revoke_key
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/keys", tags=["keys"])


#: what someone who may manage only their own keys may put on a key
OWN_KEY_SCOPES = frozenset({"ingest", "read"})


class KeyIn(BaseModel):
    scopes: list[str] = Field(min_length=1, description="any of ingest, read, admin, keys")
    name: str = Field("", max_length=256)


def _view(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "tenant"}
    out["scopes"] = sorted(out["scopes"])
    for k in ("created_at", "revoked_at"):
        if out.get(k) is not None:
            out[k] = iso_utc(out[k])
    return out


@router.post("", status_code=201, summary="Create a key for your tenant; the response holds the secret, once")
async def create(body: KeyIn, principal: KeyManager, request: Request, keys: KeysDep) -> dict:
    try:
        scopes = parse_scopes(body.scopes)
    except InvalidKeyRequest as exc:
        raise InvalidField("scopes", str(exc)) from None
    if not principal.allows("admin") and not set(scopes) <= OWN_KEY_SCOPES:
        raise Forbidden("without the admin scope a key may carry only the ingest and read scopes", "scopes")
    key_id, key = await asyncio.to_thread(create_key, request.app.state.ch_sync, principal.tenant, scopes, body.name)
    await store.record_key_owner(request.app.state.ch, principal.tenant, store.key_owner(principal), key_id)
    _audit(request, principal, "key_create", key_id, f"scopes={','.join(scopes)}")
    # usable here at once; the gateway learns it at its next reload (or on first use)
    await keys.reload()
    return {"id": key_id, "key": key, "tenant": principal.tenant, "scopes": scopes, "name": body.name}


@router.get("", summary="Your tenant's keys (never their secrets)")
async def list_(principal: KeyManager, request: Request) -> dict:
    rows = await asyncio.to_thread(list_keys, request.app.state.ch_sync, principal.tenant, True)
    if not principal.allows("admin"):
        mine = await _own_keys(request, principal)
        rows = [r for r in rows if r["id"] in mine]
    return {"keys": [_view(r) for r in rows]}


async def _own_keys(request: Request, principal: Principal) -> set[str]:
    return await store.owned_key_ids(request.app.state.ch, principal.tenant, store.key_owner(principal))


@router.delete("/{key_id}", status_code=204, summary="Revoke a key")
async def revoke(key_id: str, principal: KeyManager, request: Request, keys: KeysDep) -> None:
    if not principal.allows("admin") and key_id not in await _own_keys(request, principal):
        raise NotFound(f"live key {key_id!r}")
    if not await asyncio.to_thread(revoke_key, request.app.state.ch_sync, key_id, principal.tenant):
        raise NotFound(f"live key {key_id!r}")
    _audit(request, principal, "key_revoke", key_id)
    # this service stops accepting it now; the gateway at its next reload
    await keys.reload()


def _audit(request: Request, principal: Principal, action: str, key_id: str, detail: str = "") -> None:
    request.app.state.identity.audit.record(
        action, "ok", org=principal.tenant, actor_id=store.key_owner(principal), target=key_id, detail=detail,
        ip=request.client.host if request.client else "", user_agent=request.headers.get("user-agent", ""),
    )  # fmt: skip
