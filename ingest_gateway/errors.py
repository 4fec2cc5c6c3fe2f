"""Domain errors of the gateway and, in ``to_http``, the one place they become HTTP answers."""

from __future__ import annotations

from typing import Any

from spendstream.keys import AuthError


class GatewayError(Exception):
    status = 500
    code = "internal"
    retry_after_s: int | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BodyError(GatewayError):
    """The request body as a whole is unusable (malformed, too large, wrong type); ``status`` says how,
    ``field`` names the part of the request at fault."""

    def __init__(self, status: int, code: str, message: str, field: str = "body"):
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class Saturated(GatewayError):
    """Too many events are waiting for broker acks; the client should back off briefly."""

    status = 429
    code = "saturated"
    retry_after_s = 1


class BrokerUnavailable(GatewayError):
    """The broker did not acknowledge in time; nothing of the request counts as accepted."""

    status = 503
    code = "broker_unavailable"
    retry_after_s = 5


def refused(exc: AuthError) -> GatewayError:
    """The gateway's error for a key ``spendstream.keys.authenticate`` refused."""
    return Unauthenticated(exc.message) if exc.status == 401 else Forbidden(exc.message)


def to_http(exc: GatewayError) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """``(status, {"error", "message"} and "field" when one is at fault, extra headers)`` of a domain error."""
    headers = []
    if exc.retry_after_s is not None:
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    if isinstance(exc, Unauthenticated):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, MethodNotAllowed):
        headers.append((b"allow", b"POST"))
    body = {"error": exc.code, "message": exc.message}
    if isinstance(exc, BodyError):
        body["field"] = exc.field
    return exc.status, body, headers
