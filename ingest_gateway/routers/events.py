"""``POST /v1/events``: authenticate, parse, validate, publish, answer."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ingest_gateway import logic
from ingest_gateway.errors import Forbidden, Unauthenticated
from ingest_gateway.http import json_response
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.openapi import RESPONSES, request_body
from ingest_gateway.publisher import Publisher, encode_records
from spendstream.keys import KeyStore, Principal
from spendstream.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key with the `ingest` scope: `Bearer ss_<id>_<secret>`")


async def ingest_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None:
        raise Unauthenticated("send Authorization: Bearer <API key>")
    keys: KeyStore = request.app.state.keys
    principal = await keys.authenticate(credentials.credentials)
    if principal is None:
        raise Unauthenticated("unknown or revoked API key")
    if not principal.allows("ingest"):
        raise Forbidden("this API key lacks the 'ingest' scope")
    return principal


IngestPrincipal = Annotated[Principal, Depends(ingest_principal)]


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refusing (413) before buffering more than ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise logic.BodyError(413, "body_too_large", f"body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise logic.BodyError(413, "body_too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_router(settings: Settings) -> APIRouter:
    limits = settings.gateway
    router = APIRouter(tags=["ingest"])

    @router.post(
        "/v1/events",
        status_code=202,
        summary="Ingest usage events",
        responses=RESPONSES,
        openapi_extra=request_body(limits.max_events_per_request, limits.max_body_bytes),
    )
    async def post_events(request: Request, principal: IngestPrincipal) -> Response:
        """Validate and normalise events, publish the valid ones to `spendstream.usage.raw`, and answer
        202 once Kafka acknowledged all of them. Invalid events are listed with every field at fault;
        when none is valid the answer is 400. Retrying with the returned `event_ids` is safe."""
        started = time.perf_counter()
        metrics: GatewayMetrics = request.app.state.metrics
        headers = request.headers
        ndjson = logic.check_media_type(headers.get("content-type"))
        body = await read_body(request, limits.max_body_bytes)
        body = logic.decode_content(body, headers.get("content-encoding"), limits.max_body_bytes)
        items = logic.parse_events(body, ndjson, limits.max_events_per_request)
        ctx = logic.RequestContext.now()
        result = logic.validate_events(items, ctx)
        for reason in logic.rejection_reasons(result.rejected):
            metrics.events_rejected.labels(reason).inc()
        if result.accepted:
            publisher: Publisher = request.app.state.publisher
            records = encode_records(principal.tenant, ctx.received_at_str, result.by_project)
            await publisher.publish(records, result.accepted)
            metrics.events_accepted.inc(result.accepted)
        status = 202 if result.accepted else 400
        metrics.requests.labels(status).inc()
        metrics.request_latency.observe(time.perf_counter() - started)
        return json_response(
            {"accepted": result.accepted, "event_ids": result.event_ids, "rejected": result.rejected}, status
        )

    return router
