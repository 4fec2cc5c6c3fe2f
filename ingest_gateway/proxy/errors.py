"""The proxy's own refusals in the provider's error shape, so the SDKs raise their usual errors.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic: ``{"type": "error",
"error": {"type", "message"}}``. Budget denials are HTTP 402 with type ``budget_exceeded`` and
``x-should-retry: false`` (the SDKs retry 408/409/429/5xx unless told not to; 402 is not retried
either way, the header makes it explicit for every client that honours it).
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from ingest_gateway.proxy.usage import ANTHROPIC


class ProxyError(Exception):
    def __init__(
        self, status: int, kind: str, message: str, *, param: str | None = None, retry_after_s: int | None = None
    ):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def response(self, provider: str, request_id: str) -> Response:
        if provider == ANTHROPIC:
            body = {"type": "error", "error": {"type": self.kind, "message": self.message}, "request_id": request_id}
        else:
            body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.kind}}
        headers = {"x-should-retry": "false" if self.retry_after_s is None else "true", "x-request-id": request_id}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json", headers=headers)


def unauthenticated(provider: str, message: str) -> ProxyError:
    kind = "authentication_error" if provider == ANTHROPIC else "invalid_api_key"
    return ProxyError(401, kind, message)


def forbidden(provider: str, message: str) -> ProxyError:
    kind = "permission_error" if provider == ANTHROPIC else "permission_denied"
    return ProxyError(403, kind, message)


def invalid(provider: str, param: str, message: str, status: int = 400) -> ProxyError:
    return ProxyError(status, "invalid_request_error", f"{param}: {message}", param=param)


def budget_exceeded(message: str) -> ProxyError:
    return ProxyError(402, "budget_exceeded", message)


def unavailable(message: str, retry_after_s: int = 1) -> ProxyError:
    return ProxyError(503, "api_error", message, retry_after_s=retry_after_s)
