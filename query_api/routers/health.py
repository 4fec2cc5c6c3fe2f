"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from query_api.deps import CH

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="ClickHouse answers and the key store is loaded")
async def readyz(ch: CH) -> JSONResponse:
    try:
        ch_ok = bool(await ch.ping())
    except Exception:  # any transport failure means "not ready", never a 500
        ch_ok = False
    body = {"status": "ok" if ch_ok else "unavailable", "clickhouse": ch_ok}
    return JSONResponse(body, status_code=200 if ch_ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
