"""Provider API keys a tenant stores for the gateway's proxy, sealed at rest (spendstream/secrets.py).

Shared by the query API (``/v1/provider-keys``: create, list, delete) and the gateway (which loads
every live key into memory, opened, to call the provider). The key itself never leaves these
functions except to the gateway's upstream request: listings hold no key, no ciphertext and no
hint of either, and nothing here logs one. Table ``provider_keys``
(clickhouse/schema/0010_provider_keys.sql): a ReplacingMergeTree(version, deleted), so deleting
inserts the row again with ``deleted = 1`` and FINAL hides it.

The associated data of each ciphertext is ``provider_key/<tenant>/<id>/<provider>``: a sealed key
copied into another tenant's row, or relabelled as another provider's, does not open.
"""

from __future__ import annotations

import re
import secrets as _random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from spendstream.secrets import Keyring, SecretError

TABLE = "provider_keys"
PROVIDERS: tuple[str, ...] = ("openai", "anthropic")
MAX_NAME = 256
MAX_KEY = 4096
_COLUMNS = ["tenant", "id", "provider", "name", "project", "ciphertext", "created_at", "deleted", "version"]
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class ProviderKeyError(ValueError):
    """Invalid input for a stored provider key; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class OpenKey:
    """A live provider key, opened (gateway memory only)."""

    tenant: str
    id: str
    provider: str
    name: str
    project: str
    api_key: str
    created_at: datetime

    def __repr__(self) -> str:  # never print the key, not even in a traceback or a debugger
        return f"OpenKey(tenant={self.tenant!r}, id={self.id!r}, provider={self.provider!r}, name={self.name!r})"


def aad(tenant: str, key_id: str, provider: str) -> bytes:
    return f"provider_key/{tenant}/{key_id}/{provider}".encode()


def check_input(provider: Any, name: Any, api_key: Any, project: Any = "") -> tuple[str, str, str, str]:
    """``(provider, name, api_key, project)`` checked, or ProviderKeyError naming the field."""
    if provider not in PROVIDERS:
        raise ProviderKeyError("provider", f"must be one of {', '.join(PROVIDERS)}")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or _UNSAFE.search(name):
        raise ProviderKeyError("name", f"must be a non-blank string of at most {MAX_NAME} characters, no controls")
    if (
        not isinstance(api_key, str)
        or not api_key.strip()
        or len(api_key) > MAX_KEY
        or not api_key.isascii()
        or _UNSAFE.search(api_key)
    ):
        # the key goes into an HTTP header: printable ASCII only
        raise ProviderKeyError("api_key", f"must be a non-blank printable ASCII string of at most {MAX_KEY} characters")
    if not isinstance(project, str) or len(project) > 128 or _UNSAFE.search(project):
        raise ProviderKeyError("project", "must be a string of at most 128 characters, no controls")
    return provider, name.strip(), api_key.strip(), project.strip()


def _version() -> int:
    return time.time_ns() // 1_000


# ---------------------------------------------------------------- ClickHouse operations (sync client)


def create_provider_key(
    client: Any, keyring: Keyring, tenant: str, provider: str, name: str, api_key: str, project: str = ""
) -> dict[str, Any]:
    """Seal and store a key; the row as listed (without the key)."""
    provider, name, api_key, project = check_input(provider, name, api_key, project)
    key_id = "pk_" + _random.token_hex(8)
    sealed = keyring.encrypt(api_key.encode(), aad(tenant, key_id, provider))
    created = datetime.now(UTC)
    client.insert(
        TABLE, [[tenant, key_id, provider, name, project, sealed.hex(), created, 0, _version()]], column_names=_COLUMNS
    )
    return {"id": key_id, "provider": provider, "name": name, "project": project, "created_at": created}


def list_provider_keys(client: Any, tenant: str) -> list[dict[str, Any]]:
    """A tenant's live keys, newest first: never the key or its ciphertext."""
    rows = client.query(
        f"SELECT id, provider, name, project, created_at FROM {TABLE} FINAL WHERE tenant = {{tenant:String}} "
        "ORDER BY created_at DESC, id",
        parameters={"tenant": tenant},
    ).result_rows
    return [dict(zip(("id", "provider", "name", "project", "created_at"), row)) for row in rows]


def delete_provider_key(client: Any, tenant: str, key_id: str) -> bool:
    """Delete a live key of ``tenant``; False when there is none with that id."""
    rows = client.query(
        f"SELECT tenant, id, provider, name, project, ciphertext, created_at FROM {TABLE} FINAL "
        "WHERE tenant = {tenant:String} AND id = {id:String}",
        parameters={"tenant": tenant, "id": key_id},
    ).result_rows
    if not rows:
        return False
    # the deleted row keeps no ciphertext: a deleted key is gone from storage once rows merge
    tenant_, id_, provider, name, project, _, created = rows[0]
    client.insert(TABLE, [[tenant_, id_, provider, name, project, "", created, 1, _version()]], column_names=_COLUMNS)
    return True


def load_open_keys(client: Any, keyring: Keyring) -> tuple[list[OpenKey], int]:
    """Every live key opened, and how many could not be opened (key not configured, altered row)."""
    rows = client.query(
        f"SELECT tenant, id, provider, name, project, ciphertext, created_at FROM {TABLE} FINAL"
    ).result_rows
    keys, failed = [], 0
    for tenant, key_id, provider, name, project, ciphertext, created in rows:
        try:
            api_key = keyring.decrypt(bytes.fromhex(ciphertext), aad(tenant, key_id, provider)).decode()
        except (SecretError, ValueError):
            failed += 1
            continue
        keys.append(OpenKey(tenant, key_id, provider, name, project, api_key, created))
    return keys, failed


def reseal_all(client: Any, keyring: Keyring) -> tuple[int, int]:
    """After a rotation: every live key sealed with an older key is sealed again with the primary.
    Returns (resealed, not openable: their key is not configured or the row was altered; they stay
    as they are). Once the second is 0, the old key can be removed from the setting."""
    rows = client.query(
        f"SELECT tenant, id, provider, name, project, ciphertext, created_at FROM {TABLE} FINAL"
    ).result_rows
    out, failed = [], 0
    for tenant, key_id, provider, name, project, ciphertext, created in rows:
        try:
            blob = bytes.fromhex(ciphertext)
            if not keyring.needs_reseal(blob):
                continue
            sealed = keyring.reseal(blob, aad(tenant, key_id, provider))
        except (SecretError, ValueError):
            failed += 1
            continue
        out.append([tenant, key_id, provider, name, project, sealed.hex(), created, 0, _version()])
    if out:
        client.insert(TABLE, out, column_names=_COLUMNS)
    return len(out), failed


if __name__ == "__main__":  # python -m spendstream.provider_keys reseal
    import sys

    from spendstream.clickhouse import get_client
    from spendstream.settings import get_settings

    if sys.argv[1:] != ["reseal"]:
        sys.exit("usage: python -m spendstream.provider_keys reseal   (after putting a new key first in "
                 "SPENDSTREAM_SECRET_KEYS: seals every stored key with it)")  # fmt: skip
    settings = get_settings()
    ch = get_client(settings)
    try:
        done, failed = reseal_all(ch, Keyring.parse(settings.secret_keys.get_secret_value()))
        print(f"resealed {done} provider keys; {failed} cannot be opened with the configured keys")
    finally:
        ch.close()
