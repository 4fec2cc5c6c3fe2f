"""The query API's front door: the API key first, then the body under its limit, then FastAPI.

FastAPI reads and parses a route's body before it resolves the route's dependencies, so with the
key checked in a dependency alone a caller without a key who sends malformed JSON learns 422, and
a body of any size is buffered first. This pure ASGI middleware runs before all of that:

- a request under ``/v1/`` must carry a known API key or a person's valid access token, checked
  from its headers alone: 401 otherwise, whatever its body, of which nothing is read;
- every request's body is read here under ``query_api.max_body_bytes``: 413 naming ``body``
  beyond it (a larger Content-Length is refused unread, a chunked body as soon as it passes);
- the body read is then handed to the app as if it arrived now, and the principal is left in the
  scope for ``deps.require``, which checks the route's scope (403).

Probes, metrics, the docs and the dashboard (everything outside ``/v1/``) stay open.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api.deps import PRINCIPAL, authenticate_request
from query_api.errors import BodyTooLarge, DomainError, domain_response
from spendstream import asgi

PROTECTED_PREFIX = "/v1/"


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            if scope["path"].startswith(PROTECTED_PREFIX):
                state = scope["app"].state
                scope[PRINCIPAL] = await authenticate_request(
                    state.keys, headers, getattr(state, "identity", None), scope["path"]
                )
            body = await asgi.read_body(receive, headers.get("content-length"), self.max_body_bytes)
        except DomainError as exc:
            await domain_response(exc)(scope, receive, send)
            return
        except asgi.BodyTooLarge as exc:
            await domain_response(BodyTooLarge(str(exc)))(scope, receive, send)
            return
        except asgi.ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` giving ``body`` whole, then whatever the client sends next (its disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
