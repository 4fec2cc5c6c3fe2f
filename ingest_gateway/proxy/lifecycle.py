"""Starting and stopping the proxy's parts inside the gateway's lifespan (one call each way)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ingest_gateway.proxy.keys import ProviderKeyCache
from ingest_gateway.proxy.metrics import ProxyMetrics
from ingest_gateway.proxy.recorder import Recorder, Spool
from ingest_gateway.proxy.service import Proxy
from spendstream.pricing.catalog import default_catalog
from spendstream.settings import Settings


async def start_proxy(app: Any, settings: Settings) -> Callable[[], Awaitable[None]]:
    """``app.state.proxy`` ready (needs ``app.state.publisher``, ``keys``, ``budget_view``); returns its stop."""
    state = app.state
    metrics = ProxyMetrics(state.metrics.registry)
    spool = Spool(Path(settings.data_dir) / "proxy-spool", settings.proxy.spool_max_bytes)
    recorder = Recorder(state.publisher, spool, metrics)
    provider_keys = ProviderKeyCache(settings)
    # the catalog compiles once per process (~0.7 s), off the event loop
    catalog = await asyncio.to_thread(default_catalog)
    await provider_keys.start()
    await recorder.start()
    state.proxy = Proxy(settings, state.keys, state.budget_view, provider_keys, recorder, catalog, metrics)

    async def stop() -> None:
        await state.proxy.close()
        await recorder.close()
        await provider_keys.close()

    return stop
