"""Domain errors of the gateway. ``app.install_error_handlers`` maps them all to HTTP in one place."""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    code = "internal"
    retry_after_s: int | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


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
