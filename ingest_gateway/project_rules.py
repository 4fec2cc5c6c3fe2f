"""The gateway's in-memory copy of every tenant's project mapping rules (spendstream/project_mappings.py).

A background task re-reads ClickHouse ``project_mappings`` every ``otel.project_mappings_reload_s``
(from a worker thread, one sync client reconnected lazily); a failed read keeps the last good
rules, so ingest goes on while ClickHouse is down. Requests only read a dict: no IO per event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from spendstream.clickhouse import get_client
from spendstream.project_mappings import EMPTY, RuleSet, load_all
from spendstream.reloading import Reloader
from spendstream.settings import Settings

log = logging.getLogger(__name__)


class ProjectRules:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._by_tenant: dict[str, RuleSet] = {}
        self._client: Any = None
        self._reloader = Reloader(
            self._reload_once, name="gateway-project-rules", refresh_s=settings.otel.project_mappings_reload_s
        )
        self._healthy = True

    def for_tenant(self, tenant: str) -> RuleSet:
        return self._by_tenant.get(tenant, EMPTY)

    async def start(self) -> None:
        await self._reloader.start()

    async def close(self) -> None:
        await self._reloader.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def reload(self) -> None:
        """Reload now, or join a reload already running (reloads never overlap, so an older read
        can't replace a newer one)."""
        await self._reloader.reload()

    async def _reload_once(self) -> None:
        try:
            self._by_tenant = await asyncio.to_thread(self._load)
        except Exception as exc:  # ClickHouse down or not migrated: keep the last good rules
            log.log(logging.WARNING if self._healthy else logging.DEBUG, "project mapping rules reload failed: %s", exc)
            self._healthy = False
            return
        self._healthy = True

    def _load(self) -> dict[str, RuleSet]:
        if self._client is None:
            self._client = get_client(self._settings)
        try:
            return load_all(self._client)
        except Exception:
            self._client.close()
            self._client = None
            raise
