"""Provider API keys of the caller's tenant for the gateway's proxy (admin). The key is write-only:
it is sealed (AES-256-GCM, spendstream/secrets.py) before it is stored and no answer ever holds
it. The gateway picks a new or deleted key up within ``proxy.provider_keys_refresh_s``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from query_api.deps import Admin
from query_api.errors import DomainError, InvalidField, NotFound
from spendstream.provider_keys import (
    PROVIDERS,
    ProviderKeyError,
    create_provider_key,
    delete_provider_key,
    list_provider_keys,
)
from spendstream.secrets import Keyring, SecretError
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/provider-keys", tags=["provider keys"])


class SecretsNotConfigured(DomainError):
    status = 503
    code = "secrets_not_configured"


class ProviderKeyIn(BaseModel):
    provider: str = Field(description=f"one of {', '.join(PROVIDERS)}")
    name: str = Field(max_length=256, description="a label, to tell keys apart")
    api_key: str = Field(max_length=4096, description="the provider's API key; stored sealed, never returned")
    project: str = Field("", max_length=128, description="default project of calls made with this key")


def _keyring(request: Request) -> Keyring:
    spec = request.app.state.settings.secret_keys.get_secret_value()
    if not spec:
        raise SecretsNotConfigured(
            "storing provider keys needs SPENDSTREAM_SECRET_KEYS (see docs/proxy.md)", "secret_keys"
        )
    try:
        return Keyring.parse(spec)
    except SecretError as exc:
        raise SecretsNotConfigured(f"SPENDSTREAM_SECRET_KEYS is invalid: {exc}", "secret_keys") from None


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "created_at": iso_utc(row["created_at"])}


@router.post("", status_code=201, summary="Store a provider API key (sealed); the key is never returned")
async def create(body: ProviderKeyIn, principal: Admin, request: Request) -> dict:
    keyring = _keyring(request)
    try:
        row = await asyncio.to_thread(
            create_provider_key, request.app.state.ch_sync, keyring, principal.tenant,
            body.provider, body.name, body.api_key, body.project,
        )  # fmt: skip
    except ProviderKeyError as exc:
        raise InvalidField(exc.field, str(exc)) from None
    return _view(row)


@router.get("", summary="Your tenant's provider keys (never the keys themselves)")
async def list_(principal: Admin, request: Request) -> dict:
    rows = await asyncio.to_thread(list_provider_keys, request.app.state.ch_sync, principal.tenant)
    return {"provider_keys": [_view(r) for r in rows]}


@router.delete("/{key_id}", status_code=204, summary="Delete a provider key")
async def delete(key_id: str, principal: Admin, request: Request) -> None:
    if not await asyncio.to_thread(delete_provider_key, request.app.state.ch_sync, principal.tenant, key_id):
        raise NotFound(f"provider key {key_id!r}")
