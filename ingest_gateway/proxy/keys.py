"""Stored provider keys in the gateway's memory, opened (spendstream/provider_keys.py).

Reloaded from ClickHouse every ``proxy.provider_keys_refresh_s`` (the last good set is kept while
ClickHouse is down), and at once, at most every second, when a tenant asks for a key it has none
of (a key stored a moment ago works without waiting for the period: the reload joined began after the miss, spendstream/reloading.py). Without
``SPENDSTREAM_SECRET_KEYS`` nothing is loaded: only passthrough calls (the caller's own provider
key) work. Opened keys are never logged (``OpenKey.__repr__`` hides them).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from spendstream.clickhouse import get_client
from spendstream.provider_keys import OpenKey, load_open_keys
from spendstream.reloading import Reloader
from spendstream.secrets import Keyring, SecretError
from spendstream.settings import Settings

log = logging.getLogger(__name__)

_MISS_RELOAD_S = 1.0


class ProviderKeyCache:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._by_scope: dict[tuple[str, str], list[OpenKey]] = {}
        self._client: Any = None
        self._reloader = Reloader(
            self._reload_once,
            name="proxy-provider-keys",
            refresh_s=settings.proxy.provider_keys_refresh_s,
            miss_reload_s=_MISS_RELOAD_S,
        )
        self._failing = False
        self.unopenable = 0
        spec = settings.secret_keys.get_secret_value()
        self.keyring: Keyring | None = None
        if spec:
            try:
                self.keyring = Keyring.parse(spec)
            except SecretError as exc:
                log.error("SPENDSTREAM_SECRET_KEYS is invalid (%s): stored provider keys are not used", exc)

    async def start(self) -> None:
        if self.keyring is not None:
            await self._reloader.start()

    async def close(self) -> None:
        await self._reloader.close()
        if self._client is not None:
            self._client.close()

    async def reload(self) -> None:
        """Reload now, or join a reload already running (spendstream/reloading.py)."""
        await self._reloader.reload()

    async def _reload_once(self) -> None:
        try:
            keys, failed = await asyncio.to_thread(self._load)
        except Exception as exc:  # noqa: BLE001 - ClickHouse down or not migrated: keep the last set
            log.log(logging.DEBUG if self._failing else logging.WARNING, "provider keys reload failed: %r", exc)
            self._failing = True
            return
        self._failing = False
        if failed and failed != self.unopenable:
            log.warning("%d stored provider keys cannot be opened with the configured secret keys", failed)
        self.unopenable = failed
        by_scope: dict[tuple[str, str], list[OpenKey]] = {}
        for key in sorted(keys, key=lambda k: k.created_at, reverse=True):
            by_scope.setdefault((key.tenant, key.provider), []).append(key)
        self._by_scope = by_scope

    def _load(self) -> tuple[list[OpenKey], int]:
        assert self.keyring is not None
        if self._client is None:
            self._client = get_client(self._settings)
        try:
            return load_open_keys(self._client, self.keyring)
        except Exception:
            self._client.close()
            self._client = None
            raise

    def lookup(self, tenant: str, provider: str, name: str | None) -> OpenKey | None:
        for key in self._by_scope.get((tenant, provider), ()):
            if name is None or key.name == name or key.id == name:
                return key
        return None

    async def find(self, tenant: str, provider: str, name: str | None) -> OpenKey | None:
        """The tenant's newest key for ``provider`` (or the one named), reloading once on a miss."""
        found = self.lookup(tenant, provider, name)
        if found is not None or self.keyring is None:
            return found
        if await self._reloader.reload_on_miss():
            return self.lookup(tenant, provider, name)
        return None
