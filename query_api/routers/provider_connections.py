"""Provider admin-API connections of the caller's tenant (admin): the usage/cost collectors read
each connection's reports (docs/collectors.md). The admin key is write-only: sealed
(AES-256-GCM, spendstream/secrets.py) before it is stored; no answer ever holds it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from query_api.deps import Admin
from query_api.errors import Conflict, DomainError, InvalidField, NotFound
from spendstream.collectors.connections import (
    ConnectionError_,
    check_input,
    create_connection,
    delete_connection,
    list_connections,
)
from spendstream.money import format_usd
from spendstream.secrets import Keyring, SecretError
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/provider-connections", tags=["provider connections"])


class SecretsNotConfigured(DomainError):
    status = 503
    code = "secrets_not_configured"


def keyring(request: Request) -> Keyring:
    spec = request.app.state.settings.secret_keys.get_secret_value()
    if not spec:
        raise SecretsNotConfigured(
            "storing admin keys needs SPENDSTREAM_SECRET_KEYS (docs/collectors.md)", "secret_keys"
        )
    try:
        return Keyring.parse(spec)
    except SecretError as exc:
        raise SecretsNotConfigured(f"SPENDSTREAM_SECRET_KEYS is invalid: {exc}", "secret_keys") from None


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "provider": row["provider"], "name": row["name"], "backfill_days": int(row["backfill_days"]),
        "drift_threshold_pct": str(row["drift_threshold_pct"].normalize()),
        "drift_threshold_usd": format_usd(int(row["drift_threshold_nanos"])),
        "channels": list(row["channels"]), "project_map": dict(row["project_map"]), "created_at": iso_utc(row["created_at"]),
    }  # fmt: skip


@router.post(
    "",
    status_code=201,
    summary="Connect a provider's admin API (the key is sealed, never returned)",
    description='Body: {"provider": "openai"|"anthropic", "name", "admin_key", "backfill_days": 30 (0..90), '
    '"drift_threshold_pct": "5", "drift_threshold_usd": "1", "channels": [webhook id | e-mail, ...], '
    '"project_map": {"<provider project/workspace id>": "<Spendstream project>"}}',
)
async def create(body: dict[str, Any], principal: Admin, request: Request) -> dict:
    # a raw dict, checked by check_input: every bad field is a 422 naming it, never echoing the key
    try:
        data = check_input(body)
    except ConnectionError_ as exc:
        raise InvalidField(exc.field, str(exc)) from None
    ring = keyring(request)
    try:
        row = await asyncio.to_thread(create_connection, request.app.state.ch_sync, ring, principal.tenant, data)
    except ConnectionError_ as exc:  # too many connections
        raise Conflict(str(exc), exc.field) from None
    return _view(row)


@router.get("", summary="Your tenant's provider connections (never the keys)")
async def list_(principal: Admin, request: Request) -> dict:
    rows = await asyncio.to_thread(list_connections, request.app.state.ch_sync, principal.tenant)
    return {"provider_connections": [_view(r) for r in rows]}


@router.delete("/{connection_id}", status_code=204, summary="Delete a provider connection")
async def delete(connection_id: str, principal: Admin, request: Request) -> None:
    if len(connection_id) > 64 or not await asyncio.to_thread(
        delete_connection, request.app.state.ch_sync, principal.tenant, connection_id
    ):
        raise NotFound(f"provider connection {connection_id!r}")
