"""API keys: ``ss_<id>_<secret>``, stored only as a SHA-256 hash in ClickHouse table ``api_keys``.

Shared by the ingest gateway and the query API. A key belongs to one tenant and carries scopes
(``ingest``, ``read``, ``admin``, and ``keys``: manage the keys one created oneself; a key has
exactly the scopes it lists). The services never look
a key up in ClickHouse per request: a :class:`KeyStore` keeps every non-revoked key in memory,
reloads them periodically, and keeps serving the last good set while ClickHouse is down, so
ingest goes on for known keys. The bootstrap admin key from settings
(``SPENDSTREAM_BOOTSTRAP_ADMIN_KEY``) is accepted without ClickHouse.

``api_keys`` is a ReplacingMergeTree(version) ordered by ``id``: revoking inserts a newer row
with ``revoked_at`` set, so ``FINAL`` shows each key's latest state.

``authenticate`` is the one check of a request's key, for both services: they call it with the
raw headers before they read a byte of the body (see ingest_gateway/ingest.py, query_api/guard.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from spendstream.reloading import Reloader
from spendstream.settings import Settings

log = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("ingest", "read", "admin", "keys")
KEY_PREFIX = "ss"
TABLE = "api_keys"
_KEY_RE = re.compile(r"^ss_([0-9a-f]{16})_[A-Za-z0-9_-]{20,}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class InvalidKeyRequest(ValueError):
    """A key operation was asked with invalid arguments (bad tenant, unknown scope)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for. The tenant always comes from here, never from a request body."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str = ""
    #: set for a person's access token (spendstream.identity): the user, the login session, the
    #: role in ``tenant`` the scopes came from; empty for an API key
    user_id: str = ""
    session_id: str = ""
    role: str = ""

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class StoredKey:
    principal: Principal
    key_hash: bytes  # sha256 digest of the whole key string


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None (no lookup happens for malformed keys)."""
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


def parse_scopes(scopes: str | Iterable[str]) -> list[str]:
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    out = sorted({s.strip().lower() for s in items if s.strip()})
    unknown = [s for s in out if s not in SCOPES]
    if unknown or not out:
        raise InvalidKeyRequest(
            f"scopes must be a non-empty subset of {','.join(SCOPES)}; got {','.join(items) or '(none)'}"
        )
    return out


def check_tenant(tenant: str) -> str:
    # '/' would break the tenant/project Kafka key; the rest keeps tenants safe in URLs and labels
    if not _TENANT_RE.match(tenant):
        raise InvalidKeyRequest(f"tenant {tenant!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
    return tenant


def new_key() -> tuple[str, str]:
    """(id, key): 64-bit hex id, 256-bit url-safe secret."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def _version() -> int:
    return time.time_ns() // 1_000


# ---------------------------------------------------------------- ClickHouse operations (sync client)


def create_key(client: Any, tenant: str, scopes: str | Iterable[str], name: str = "") -> tuple[str, str]:
    """Store a new key; return ``(id, key)``. The key string is never stored, only its hash."""
    check_tenant(tenant)
    scope_list = parse_scopes(scopes)
    key_id, key = new_key()
    client.insert(
        TABLE,
        [[key_id, tenant, name, hash_key(key).hex(), key[: len(KEY_PREFIX) + 1 + len(key_id)], scope_list,
          datetime.now(UTC), None, _version()]],
        column_names=["id", "tenant", "name", "key_hash", "prefix", "scopes", "created_at", "revoked_at", "version"],
    )  # fmt: skip
    return key_id, key


def list_keys(client: Any, tenant: str | None = None, include_revoked: bool = False) -> list[dict[str, Any]]:
    """Keys without their hashes, newest first."""
    where, params = [], {}
    if tenant is not None:
        where.append("tenant = {tenant:String}")
        params["tenant"] = tenant
    if not include_revoked:
        where.append("revoked_at IS NULL")
    sql = f"SELECT id, tenant, name, prefix, scopes, created_at, revoked_at FROM {TABLE} FINAL"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = client.query(sql + " ORDER BY created_at DESC", parameters=params).result_rows
    cols = ("id", "tenant", "name", "prefix", "scopes", "created_at", "revoked_at")
    return [dict(zip(cols, row)) for row in rows]


def revoke_key(client: Any, key_id: str, tenant: str | None = None) -> bool:
    """Mark a key revoked (a newer row version); False when no such live key (of that tenant)."""
    params: dict[str, Any] = {"id": key_id}
    sql = (
        f"SELECT id, tenant, name, key_hash, prefix, scopes, created_at FROM {TABLE} FINAL "
        "WHERE id = {id:String} AND revoked_at IS NULL"
    )
    if tenant is not None:
        sql += " AND tenant = {tenant:String}"
        params["tenant"] = tenant
    rows = client.query(sql, parameters=params).result_rows
    if not rows:
        return False
    client.insert(
        TABLE,
        [[*rows[0], datetime.now(UTC), _version()]],
        column_names=["id", "tenant", "name", "key_hash", "prefix", "scopes", "created_at", "revoked_at", "version"],
    )
    return True


def load_live_keys(client: Any) -> list[StoredKey]:
    rows = client.query(
        f"SELECT id, tenant, name, key_hash, scopes FROM {TABLE} FINAL WHERE revoked_at IS NULL"
    ).result_rows
    return [
        StoredKey(Principal(key_id, tenant, frozenset(scopes), name), bytes.fromhex(key_hash))
        for key_id, tenant, name, key_hash, scopes in rows
    ]


def connect(settings: Settings) -> Any:
    """A sync clickhouse-connect client on the Spendstream database."""
    from spendstream.clickhouse import get_client

    return get_client(settings)


def clickhouse_loader(settings: Settings) -> Callable[[], Awaitable[list[StoredKey]]]:
    """The ``load`` of a :class:`KeyStore` reading ClickHouse: one sync client, (re)connected lazily
    (ClickHouse may be down when a service starts) and used from a worker thread."""
    client: Any = None

    def load_sync() -> list[StoredKey]:
        nonlocal client
        if client is None:
            client = connect(settings)
        try:
            return load_live_keys(client)
        except Exception:
            client.close()
            client = None
            raise

    async def load() -> list[StoredKey]:
        return await asyncio.to_thread(load_sync)

    return load


def cli_create(settings: Settings, tenant: str, scopes: str, name: str = "", as_json: bool = False) -> None:
    """``spendstream keys create``: print the new key once (only its hash is kept)."""
    import typer

    try:
        scope_list = parse_scopes(scopes)
        check_tenant(tenant)
    except InvalidKeyRequest as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    try:
        client = connect(settings)
        try:
            key_id, key = create_key(client, tenant, scope_list, name)
        finally:
            client.close()
    except Exception as exc:  # unreachable or unmigrated ClickHouse: say so instead of a traceback
        typer.echo(f"cannot store the key in {settings.clickhouse.database}.{TABLE} at {settings.clickhouse_url}: {exc}",
                   err=True)  # fmt: skip
        typer.echo("(is ClickHouse up, and has `spendstream migrate` run against it?)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"id": key_id, "key": key, "tenant": tenant, "scopes": scope_list}))
    else:
        typer.echo(f"created key {key_id} for tenant {tenant} with scopes {','.join(scope_list)}")
        typer.echo("store it now, it is not shown again:")
        typer.echo(key)


# ---------------------------------------------------------------- in-memory cache


class KeyStore:
    """Every live key in memory, refreshed every ``refresh_s``; serves the last good set on failure.

    ``load`` is an async callable returning the live keys (``None`` = bootstrap key only). An
    unknown but well-formed key id triggers an early reload (at most once per ``miss_reload_s``)
    so a key just created works at once rather than after the next periodic refresh; a request
    waits at most ``miss_wait_s`` for it.
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[list[StoredKey]]] | None,
        *,
        bootstrap_key: str = "",
        bootstrap_tenant: str = "dev",
        refresh_s: float = 2.0,
        miss_reload_s: float = 0.5,
        miss_wait_s: float = 2.0,
        on_reload: Callable[[int | None], None] | None = None,
    ) -> None:
        self._load = load
        self._bootstrap = (
            StoredKey(
                Principal("bootstrap", bootstrap_tenant, frozenset(SCOPES), "bootstrap admin"), hash_key(bootstrap_key)
            )
            if bootstrap_key
            else None
        )
        self._by_id: dict[str, StoredKey] = {}
        self._on_reload = on_reload
        self._reloader = Reloader(
            self._reload_once,
            name="keystore-refresh",
            refresh_s=refresh_s,
            miss_reload_s=miss_reload_s,
            miss_wait_s=miss_wait_s,
        )
        self.loaded = load is None
        self._healthy = True
        self.last_success: float | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, load: Callable[[], Awaitable[list[StoredKey]]] | None, **kw: Any
    ) -> KeyStore:
        return cls(
            load,
            bootstrap_key=settings.bootstrap_admin_key.get_secret_value(),
            bootstrap_tenant=settings.bootstrap_tenant,
            refresh_s=settings.gateway.key_cache_refresh_s,
            **kw,
        )

    def __len__(self) -> int:
        return len(self._by_id)

    async def start(self) -> None:
        if self._load is not None:
            await self._reloader.start()

    async def close(self) -> None:
        await self._reloader.close()

    async def reload(self, *, started_after: float | None = None) -> None:
        """Reload now, or join a reload already running (see :class:`Reloader`). Failures keep
        the last good set."""
        await self._reloader.reload(started_after=started_after)

    async def _reload_once(self) -> None:
        assert self._load is not None
        try:
            keys = await self._load()
        except Exception as exc:  # ClickHouse down or schema missing: keep serving what we have
            # one warning per outage, not one per refresh period; metrics count every failure
            log.log(
                logging.WARNING if self._healthy else logging.DEBUG,
                "API key reload failed, serving %d cached keys: %s",
                len(self._by_id),
                exc,
            )
            self._healthy = False
            if self._on_reload:
                self._on_reload(None)
            return
        if not self._healthy:
            log.info("API keys reloaded: %d live keys", len(keys))
        self._healthy = True
        self._by_id = {k.principal.key_id: k for k in keys}
        self.loaded = True
        self.last_success = time.monotonic()
        if self._on_reload:
            self._on_reload(len(self._by_id))

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key`` from the cache only; constant-time hash comparison."""
        digest = hash_key(key)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap.key_hash):
            return self._bootstrap.principal
        key_id = key_id_of(key)
        stored = self._by_id.get(key_id) if key_id else None
        if stored is not None and hmac.compare_digest(digest, stored.key_hash):
            return stored.principal
        return None

    async def authenticate(self, key: str) -> Principal | None:
        principal = self.lookup(key)
        if principal is not None or self._load is None:
            return principal
        key_id = key_id_of(key)
        if key_id and key_id not in self._by_id and await self._reloader.reload_on_miss():
            return self.lookup(key)
        return None


# ---------------------------------------------------------------- request authentication


class AuthError(Exception):
    """A request's key was refused: ``status`` 401 (none, malformed, unknown or revoked) or 403
    (none of the scopes the route needs). Each service renders it in its own error format."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field  # the header at fault, when it is not the credential itself (X-Org-Id)


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``X-API-Key: <key>``."""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


def check_scopes(principal: Principal, scopes: Collection[str]) -> Principal:
    """``principal`` when it holds one of ``scopes`` (any key when none are asked), else 403."""
    if scopes and not any(principal.allows(s) for s in scopes):
        needed = " or ".join(repr(s) for s in sorted(scopes))
        if principal.user_id:
            raise AuthError(
                403, f"your role {principal.role!r} in organisation {principal.tenant!r} lacks the {needed} scope"
            )
        raise AuthError(403, f"this API key needs the {needed} scope")
    return principal


async def authenticate(
    keys: KeyStore, authorization: str | None, api_key: str | None = None, scopes: Collection[str] = ()
) -> Principal:
    """The principal of the key in a request's ``Authorization`` / ``X-API-Key`` header, holding
    one of ``scopes``; AuthError otherwise."""
    key = presented_key(authorization, api_key)
    if key is None:
        raise AuthError(401, "send Authorization: Bearer <API key> (or X-API-Key: <API key>)")
    principal = await keys.authenticate(key)
    if principal is None:
        raise AuthError(401, "unknown or revoked API key")
    return check_scopes(principal, scopes)
