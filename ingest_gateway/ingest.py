"""``POST /v1/events`` as a pure ASGI handler in front of FastAPI's whole middleware stack.

Why not a FastAPI route: for a single-event post, FastAPI's middleware, routing, request wrapper
and dependency resolution cost more CPU than authenticating, validating and publishing the event
(measured with py-spy: ~55% of the process against ~25%). ``app.GatewayApp`` puts this handler
outside the stack; every other path goes on to FastAPI unchanged, and the app's lifespan owns the
clients used here. An unexpected exception becomes a logged 500 here, as ServerErrorMiddleware
would do. The OpenAPI description of the route is written in ``openapi.py``.

Order of checks: method, authentication (401/403), media type (415), size (413), body (400),
then per-event validation, publishing (503/429) and the 202/400 answer. The key is checked from
the headers alone, so a caller without a valid one gets its 401 whatever body it sends, and no
byte of that body is read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ingest_gateway import logic
from ingest_gateway.errors import BodyError, GatewayError, MethodNotAllowed, refused, to_http
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.publisher import Publisher
from spendstream import asgi, keys
from spendstream.keys import KeyStore, Principal
from spendstream.settings import Settings

log = logging.getLogger(__name__)

PATH = "/v1/events"
_JSON = (b"content-type", b"application/json")


async def authenticate(store: KeyStore, authorization: str | None, api_key: str | None, *scopes: str) -> Principal:
    """``spendstream.keys.authenticate`` with the gateway's errors (401/403)."""
    try:
        return await keys.authenticate(store, authorization, api_key, scopes)
    except keys.AuthError as exc:
        raise refused(exc) from None


async def read_body(receive: Receive, content_length: bytes | str | None, max_bytes: int) -> bytes:
    """The raw body, refusing (413) before buffering more than ``max_bytes``."""
    try:
        return await asgi.read_body(receive, content_length, max_bytes)
    except asgi.BodyTooLarge as exc:
        raise BodyError(413, "body_too_large", str(exc)) from None


class IngestMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.max_events = settings.gateway.max_events_per_request
        self.max_bytes = settings.gateway.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        metrics: GatewayMetrics = state.metrics
        started = time.perf_counter()
        try:
            status, body, headers = await self._handle(scope, receive, state, metrics)
        except GatewayError as exc:
            status, body, headers = to_http(exc)
        except asgi.ClientGone:
            return
        except Exception:
            log.exception("POST %s failed", PATH)
            status, body, headers = 500, {"error": "internal", "message": "internal error"}, []
        metrics.request_count(status).inc()
        metrics.request_latency.observe(time.perf_counter() - started)
        payload = logic.encode(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_JSON, (b"content-length", str(len(payload)).encode()), *headers],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _handle(
        self, scope: Scope, receive: Receive, state: Any, metrics: GatewayMetrics
    ) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"{scope['method']} is not allowed on {PATH}; use POST")
        headers = dict(scope["headers"])
        principal = await authenticate(
            state.keys, _text(headers.get(b"authorization")), _text(headers.get(b"x-api-key")), "ingest"
        )
        ndjson = logic.check_media_type(headers.get(b"content-type", b"").decode("latin-1"))
        body = await read_body(receive, headers.get(b"content-length"), self.max_bytes)
        encoding = headers.get(b"content-encoding")
        if encoding is not None:
            body = logic.decode_content(body, encoding.decode("latin-1"), self.max_bytes)
        ctx = logic.RequestContext.now(state.project_rules.for_tenant(principal.tenant))
        result = logic.validate_body(body, ndjson, self.max_events, ctx)
        for reason in logic.rejection_reasons(result.rejected):
            metrics.events_rejected.labels(reason).inc()
        if result.accepted:
            publisher: Publisher = state.publisher
            try:
                await publisher.publish(principal.tenant, ctx.received_at_str, result.by_project, result.accepted)
            except GatewayError as exc:  # 503/429: none of the request's events counts as accepted
                metrics.events_rejected.labels(exc.code).inc(result.accepted)
                raise
            metrics.events_accepted.inc(result.accepted)
        answer = {"accepted": result.accepted, "event_ids": result.event_ids, "rejected": result.rejected}
        return (202 if result.accepted else 400), answer, []


def _text(header: bytes | None) -> str | None:
    return None if header is None else header.decode("latin-1")
