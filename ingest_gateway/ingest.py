"""``POST /v1/events`` as a pure ASGI handler in front of FastAPI's whole middleware stack.

Why not a FastAPI route: for a single-event post, FastAPI's middleware, routing, request wrapper
and dependency resolution cost more CPU than authenticating, validating and publishing the event
(measured with py-spy: ~55% of the process against ~25%). ``app.GatewayApp`` puts this handler
outside the stack; every other path goes on to FastAPI unchanged, and the app's lifespan owns the
clients used here. An unexpected exception becomes a logged 500 here, as ServerErrorMiddleware
would do. The OpenAPI description of the route is written in ``openapi.py``.

Order of checks: method, authentication (401/403), media type (415), size (413), body (400),
then per-event validation, publishing (503/429) and the 202/400 answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ingest_gateway import logic
from ingest_gateway.errors import BodyError, Forbidden, GatewayError, MethodNotAllowed, Unauthenticated, to_http
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.publisher import Publisher
from spendstream.keys import KeyStore, Principal
from spendstream.settings import Settings

log = logging.getLogger(__name__)

PATH = "/v1/events"
_JSON = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


async def authenticate(keys: KeyStore, authorization: bytes | None, scope: str) -> Principal:
    if not authorization:
        raise Unauthenticated("send Authorization: Bearer <API key>")
    kind, _, key = authorization.decode("latin-1").partition(" ")
    if kind.lower() != "bearer" or not key.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <API key>'")
    principal = await keys.authenticate(key.strip())
    if principal is None:
        raise Unauthenticated("unknown or revoked API key")
    if not principal.allows(scope):
        raise Forbidden(f"this API key lacks the {scope!r} scope")
    return principal


async def read_body(receive: Receive, declared_length: bytes | None, max_bytes: int) -> bytes:
    """The raw body, refusing (413) before buffering more than ``max_bytes``."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise BodyError(413, "body_too_large", f"body exceeds {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyError(413, "body_too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
        except ClientGone:
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
        principal = await authenticate(state.keys, headers.get(b"authorization"), "ingest")
        ndjson = logic.check_media_type(headers.get(b"content-type", b"").decode("latin-1"))
        body = await read_body(receive, headers.get(b"content-length"), self.max_bytes)
        encoding = headers.get(b"content-encoding")
        if encoding is not None:
            body = logic.decode_content(body, encoding.decode("latin-1"), self.max_bytes)
        ctx = logic.RequestContext.now()
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
