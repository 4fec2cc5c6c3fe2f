"""The gateway's FastAPI app. The lifespan owns the Kafka producer and the API key cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from ingest_gateway.budget_view import BudgetView
from ingest_gateway.ingest import IngestMiddleware
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.openapi import add_ingest_path
from ingest_gateway.project_rules import ProjectRules
from ingest_gateway.proxy import router as proxy_router
from ingest_gateway.proxy.lifecycle import start_proxy
from ingest_gateway.proxy.service import ProxyFrontDoor
from ingest_gateway.publisher import Publisher
from ingest_gateway.routers import budget_check, health, otlp
from spendstream.keys import KeyStore, clickhouse_loader
from spendstream.settings import Settings


class GatewayApp(FastAPI):
    """FastAPI with ``POST /v1/events`` served in front of its middleware stack (see ingest.py), and
    the AI API proxy's ``/proxy/...`` too (proxy/service.py)."""

    ingest_settings: Settings

    def build_middleware_stack(self) -> ASGIApp:
        return IngestMiddleware(ProxyFrontDoor(super().build_middleware_stack()), self.ingest_settings)


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; API keys come from ClickHouse ``api_keys`` (and the bootstrap key from settings)."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings, metrics)
        keys = KeyStore.from_settings(settings, clickhouse_loader(settings), on_reload=_key_metrics(metrics))
        budget_view = BudgetView(settings)
        project_rules = ProjectRules(settings)
        await publisher.start()
        await keys.start()
        await budget_view.start()
        await project_rules.start()
        app.state.publisher, app.state.keys, app.state.budget_view = publisher, keys, budget_view
        app.state.project_rules = project_rules
        metrics.in_flight_events.set_function(lambda: publisher.in_flight)
        stop_proxy = await start_proxy(app, settings)
        try:
            yield
        finally:
            await project_rules.close()
            await stop_proxy()
            await budget_view.close()
            await keys.close()
            await publisher.close()

    app = GatewayApp(
        title="Spendstream ingest gateway",
        version="1",
        description="Usage events in (contract v1), published to Kafka `spendstream.usage.raw` once acknowledged.",
        lifespan=lifespan,
        # the gateway exports Prometheus metrics; FastAPI's native OpenTelemetry costs a look at the
        # global providers (os.environ reads) on every request even when nothing is configured:
        # ~7% of the gateway's CPU on single-event posts (py-spy)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.metrics = metrics
    app.ingest_settings = settings
    app.include_router(health.router)
    app.include_router(budget_check.router)
    app.include_router(otlp.router)
    app.include_router(proxy_router.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_ingest_path(
                FastAPI.openapi(app), settings.gateway.max_events_per_request, settings.gateway.max_body_bytes
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _key_metrics(metrics: GatewayMetrics) -> Callable[[int | None], None]:
    def on_reload(count: int | None) -> None:
        if count is None:
            metrics.key_refresh_failures.inc()
        else:
            metrics.keys_loaded.set(count)

    return on_reload
