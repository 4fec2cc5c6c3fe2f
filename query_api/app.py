"""The query API: analytics, export, pricing, projects/keys, analysts' SQL and the dashboard.

``create_app(settings)`` builds the FastAPI app with the settings on ``app.state.settings``; its
lifespan owns the ClickHouse async client (``app.state.ch``), a sync client for the shared key
functions (``app.state.ch_sync``), the API key store (``app.state.keys``), the compiled price
catalog (``app.state.catalog``) and people's login state (``app.state.identity``).
Every request passes ``query_api.guard`` first (API key, then body size limit).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

import query_api.routers.project_mappings
from query_api.errors import install_error_handlers
from query_api.guard import RequestGuard
from query_api.identity import Identity
from query_api.insights import ForecastRunner
from query_api.metrics import ApiMetrics, MetricsMiddleware
from query_api.routers import (
    alerts,
    analytics,
    anomaly_settings,
    auth,
    budgets,
    collectors,
    export,
    health,
    insights,
    keys,
    orgs,
    pricing,
    projects,
    provider_connections,
    provider_keys,
    reconciliation,
    reprice,
    sql,
    webhooks,
)
from query_api.routers.reprice import propose_after_catalog_change
from spendstream.clickhouse import get_async_client, get_client
from spendstream.keys import KeyStore, load_live_keys
from spendstream.pricing.catalog import default_catalog
from spendstream.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"

#: one router per domain, in the order they appear in the OpenAPI document (reprice before pricing:
#: pricing's GET /{provider}/{model:path} would take /reprice/{id})
ROUTERS = (
    health,
    analytics,
    export,
    reprice,
    pricing,
    projects,
    keys,
    provider_keys,
    sql,
    budgets,
    webhooks,
    alerts,
    auth,
    orgs,
    query_api.routers.project_mappings,
    insights,
    anomaly_settings,
    provider_connections,
    reconciliation,
    collectors,
)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.ch = await get_async_client(settings)
        # spendstream.keys speaks the sync client; its calls run in worker threads
        app.state.ch_sync = get_client(settings)

        async def load_keys():
            return await asyncio.to_thread(load_live_keys, app.state.ch_sync)

        app.state.keys = KeyStore.from_settings(settings, load_keys)
        # compiled once (≈0.7 s) off the event loop; the pricing router serves from it
        app.state.catalog, _, app.state.identity = await asyncio.gather(
            asyncio.to_thread(default_catalog),
            app.state.keys.start(),
            Identity.start(settings, lambda: app.state.ch, app.state.metrics),
        )
        app.state.catalog_check = propose_after_catalog_change(app)  # re-pricing (#21): a new catalog's prices
        app.state.forecasts = ForecastRunner(settings.insights)
        if settings.insights.forecast_warm_up:
            app.state.forecasts.start_background()
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.forecasts.close)
            await app.state.identity.close()
            await app.state.keys.close()
            await app.state.ch.close()
            app.state.ch_sync.close()

    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from the package, not from a CDN
    app = FastAPIOffline(
        title="Spendstream query API",
        version="1",
        summary="Analytics, export, pricing, projects and keys, analysts' SQL, and the live dashboard.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    # the last added runs first: metrics count the guard's 401s and 413s too
    app.add_middleware(RequestGuard, max_body_bytes=settings.query_api.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app
