"""Provider admin-API connections of a tenant, their admin keys sealed at rest with the same
mechanism as the proxy's provider keys (spendstream/secrets.py). Table ``provider_connections``
(clickhouse/schema/0016_provider_reports.sql): ReplacingMergeTree(version, deleted).

The admin key never leaves these functions except to the collector's request headers: listings
hold no key, no ciphertext and no hint of either; ``OpenConnection``'s repr leaves it out. The
associated data of each ciphertext is ``provider_connection/<tenant>/<id>/<provider>``.
"""

from __future__ import annotations

import re
import secrets as _random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from spendstream.collectors.registry import PROVIDERS
from spendstream.collectors.windows import MAX_BACKFILL_DAYS
from spendstream.money import MoneyError, MoneyRule
from spendstream.secrets import Keyring, SecretError

TABLE = "provider_connections"
MAX_NAME = 256
MAX_KEY = 4096
DEFAULT_DRIFT_PCT = Decimal("5")
DEFAULT_DRIFT_USD = "1"
DRIFT_USD = MoneyRule("drift_threshold_usd", 0, 10**6 * 10**9)
_COLUMNS = [
    "tenant", "id", "provider", "name", "ciphertext", "backfill_days", "drift_threshold_pct",
    "drift_threshold_nanos", "channels", "project_map", "created_at", "deleted", "version",
]  # fmt: skip
_LISTED = (
    "id", "provider", "name", "backfill_days", "drift_threshold_pct", "drift_threshold_nanos", "channels",
    "project_map", "created_at",
)  # fmt: skip
MAX_PROJECT_MAP = 1000
MAX_CHANNELS = 16
MAX_PER_TENANT = 50  # live connections of one tenant: each is collected on every run
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class ConnectionError_(ValueError):
    """Invalid input for a connection; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ConnectionInput:
    provider: str
    name: str
    admin_key: str
    backfill_days: int
    drift_threshold_pct: Decimal
    drift_threshold_nanos: int
    channels: tuple[str, ...] = ()
    project_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpenConnection:
    """A live connection with its admin key opened (collector memory only)."""

    tenant: str
    id: str
    provider: str
    name: str
    admin_key: str
    backfill_days: int
    drift_threshold_pct: Decimal
    drift_threshold_nanos: int
    channels: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never print the key, not even in a traceback
        return f"OpenConnection(tenant={self.tenant!r}, id={self.id!r}, provider={self.provider!r})"


def aad(tenant: str, connection_id: str, provider: str) -> bytes:
    return f"provider_connection/{tenant}/{connection_id}/{provider}".encode()


def check_input(body: dict[str, Any]) -> ConnectionInput:
    """The request body checked, or ConnectionError_ naming the field."""
    provider = body.get("provider")
    if provider not in PROVIDERS:
        raise ConnectionError_("provider", f"must be one of {', '.join(PROVIDERS)}")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or _UNSAFE.search(name):
        raise ConnectionError_("name", f"must be a non-blank string of at most {MAX_NAME} characters, no controls")
    key = body.get("admin_key")
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY or not key.isascii() or _UNSAFE.search(key):
        raise ConnectionError_(
            "admin_key", f"must be a non-blank printable ASCII string of at most {MAX_KEY} characters"
        )
    days = body.get("backfill_days", 30)
    if type(days) is not int or not 0 <= days <= MAX_BACKFILL_DAYS:
        raise ConnectionError_("backfill_days", f"must be an integer in 0..{MAX_BACKFILL_DAYS}")
    pct_raw = body.get("drift_threshold_pct", str(DEFAULT_DRIFT_PCT))
    try:
        if type(pct_raw) not in (str, int, float) or len(str(pct_raw)) > 16:
            raise InvalidOperation
        pct = Decimal(str(pct_raw))
        if not pct.is_finite() or not 0 <= pct <= 1_000_000 or pct != pct.quantize(Decimal("0.001")):
            raise InvalidOperation
    except InvalidOperation:
        raise ConnectionError_("drift_threshold_pct", "must be a decimal in 0..1000000 with at most 3 places") from None
    try:
        usd = DRIFT_USD.nanos(body.get("drift_threshold_usd", DEFAULT_DRIFT_USD))
    except MoneyError as exc:
        raise ConnectionError_("drift_threshold_usd", exc.message) from None
    channels = body.get("channels", [])
    if (
        not isinstance(channels, list)
        or len(channels) > MAX_CHANNELS
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME and not _UNSAFE.search(c) for c in channels)
    ):
        raise ConnectionError_("channels", f"must be a list of at most {MAX_CHANNELS} webhook ids or e-mail addresses")
    project_map = body.get("project_map", {})
    if (
        not isinstance(project_map, dict)
        or len(project_map) > MAX_PROJECT_MAP
        or not all(
            isinstance(v, str) and len(k) <= 128 and 0 < len(v) <= 128 and not _UNSAFE.search(k + v)
            for k, v in project_map.items()
        )
    ):
        raise ConnectionError_(
            "project_map",
            f"must map at most {MAX_PROJECT_MAP} provider project/workspace ids ('' = none) to project names",
        )
    return ConnectionInput(
        provider, name.strip(), key.strip(), days, pct, usd, tuple(dict.fromkeys(channels)), dict(project_map)
    )


def _version() -> int:
    return time.time_ns() // 1_000


def create_connection(client: Any, keyring: Keyring, tenant: str, data: ConnectionInput) -> dict[str, Any]:
    """Seal and store a connection; the row as listed (without the key). ConnectionError_ (field
    ``provider``) when the tenant already has MAX_PER_TENANT live connections."""
    live = client.query(
        f"SELECT count() FROM {TABLE} FINAL WHERE tenant = {{tenant:String}}", parameters={"tenant": tenant}
    ).result_rows[0][0]
    if live >= MAX_PER_TENANT:
        raise ConnectionError_("provider", f"at most {MAX_PER_TENANT} connections per tenant; delete one first")
    connection_id = "pc_" + _random.token_hex(8)
    sealed = keyring.encrypt(data.admin_key.encode(), aad(tenant, connection_id, data.provider))
    created = datetime.now(UTC)
    row = [tenant, connection_id, data.provider, data.name, sealed.hex(), data.backfill_days,
           data.drift_threshold_pct, data.drift_threshold_nanos, list(data.channels), data.project_map, created, 0,
           _version()]  # fmt: skip
    client.insert(TABLE, [row], column_names=_COLUMNS)
    return dict(zip(_LISTED, (connection_id, data.provider, data.name, data.backfill_days, data.drift_threshold_pct,
                              data.drift_threshold_nanos, list(data.channels), data.project_map, created)))  # fmt: skip


def list_connections(client: Any, tenant: str) -> list[dict[str, Any]]:
    """A tenant's live connections, newest first: never the key or its ciphertext."""
    rows = client.query(
        f"SELECT {', '.join(_LISTED)} FROM {TABLE} FINAL WHERE tenant = {{tenant:String}} ORDER BY created_at DESC, id",
        parameters={"tenant": tenant},
    ).result_rows
    return [dict(zip(_LISTED, row)) for row in rows]


def delete_connection(client: Any, tenant: str, connection_id: str) -> bool:
    """Delete a live connection; False when there is none. The deleted row keeps no ciphertext.
    Its collected figures stay (history), but reconciliation only reads live connections."""
    rows = client.query(
        f"SELECT {', '.join(_COLUMNS[:-2])} FROM {TABLE} FINAL WHERE tenant = {{tenant:String}} AND id = {{id:String}}",
        parameters={"tenant": tenant, "id": connection_id},
    ).result_rows
    if not rows:
        return False
    row = list(rows[0])
    row[4] = ""
    client.insert(TABLE, [[*row, 1, _version()]], column_names=_COLUMNS)
    return True


def load_open_connections(
    client: Any,
    keyring: Keyring,
    *,
    provider: str | None = None,
    tenant: str | None = None,
    ids: list[str] | None = None,
) -> tuple[list[OpenConnection], int]:
    """Live connections opened (optionally of one provider / tenant / ids), and how many could not be."""
    where, params = [], {}
    if provider is not None:
        where.append("provider = {provider:String}")
        params["provider"] = provider
    if tenant is not None:
        where.append("tenant = {tenant:String}")
        params["tenant"] = tenant
    if ids is not None:
        where.append("id IN {ids:Array(String)}")
        params["ids"] = ids
    rows = client.query(
        "SELECT tenant, id, provider, name, ciphertext, backfill_days, drift_threshold_pct, drift_threshold_nanos, "
        f"channels "
        f"FROM {TABLE} FINAL {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY tenant, id",
        parameters=params,
    ).result_rows
    out, failed = [], 0
    for tenant_, cid, prov, name, ciphertext, days, pct, nanos, channels in rows:
        try:
            key = keyring.decrypt(bytes.fromhex(ciphertext), aad(tenant_, cid, prov)).decode()
        except (SecretError, ValueError):
            failed += 1
            continue
        out.append(OpenConnection(tenant_, cid, prov, name, key, int(days), Decimal(pct), int(nanos), tuple(channels)))
    return out, failed
