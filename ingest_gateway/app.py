"""The gateway's FastAPI app. The lifespan owns the Kafka producer and the API key cache."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from ingest_gateway.errors import GatewayError, Unauthenticated
from ingest_gateway.http import json_response
from ingest_gateway.logic import BodyError
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.publisher import Publisher
from ingest_gateway.routers import events, health
from spendstream.keys import KeyStore, StoredKey, clickhouse_loader
from spendstream.settings import Settings

log = logging.getLogger(__name__)

KeyLoader = Callable[[], Awaitable[list[StoredKey]]]


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    """Every domain error becomes ``{"error": code, "message": ...}`` with its status, here only."""

    def respond(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        metrics.requests.labels(status).inc()
        return json_response({"error": code, "message": message}, status, headers)

    @app.exception_handler(BodyError)
    async def body_error(_: Request, exc: BodyError) -> Response:
        return respond(exc.status, exc.code, exc.message)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> Response:
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = "Bearer"
        return respond(exc.status, exc.code, exc.message, headers)


def create_app(settings: Settings, key_loader: KeyLoader | None = None) -> FastAPI:
    """The gateway app. ``key_loader`` defaults to reading ``api_keys`` from ClickHouse."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings, metrics)
        keys = KeyStore.from_settings(
            settings, key_loader or clickhouse_loader(settings), on_reload=_key_metrics(metrics)
        )
        await publisher.start()
        await keys.start()
        app.state.publisher, app.state.keys = publisher, keys
        try:
            yield
        finally:
            await keys.close()
            await publisher.close()

    app = FastAPI(
        title="Spendstream ingest gateway",
        version="1",
        description="Usage events in (contract v1), published to Kafka `spendstream.usage.raw` once acknowledged.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app, metrics)
    app.include_router(events.build_router(settings))
    app.include_router(health.router)
    return app


def _key_metrics(metrics: GatewayMetrics) -> Callable[[int | None], None]:
    def on_reload(count: int | None) -> None:
        if count is None:
            metrics.key_refresh_failures.inc()
        else:
            metrics.keys_loaded.set(count)

    return on_reload
