"""Probes and metrics: ``/healthz`` (process up), ``/readyz`` (broker reachable, keys loaded), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest_gateway.http import json_response

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Process is up")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Broker reachable and API keys loaded",
    responses={503: {"description": "not ready; the body says which part is missing"}},
)
async def readyz(request: Request) -> Response:
    broker = await request.app.state.publisher.ready()
    keys = request.app.state.keys.loaded
    body = {"status": "ready" if broker and keys else "not_ready", "broker": broker, "api_keys_loaded": keys}
    return json_response(body, status_code=200 if broker and keys else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
