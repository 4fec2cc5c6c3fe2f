"""Domain errors of the query API and their one mapping to HTTP.

Routers and pure modules raise these; ``install_error_handlers`` renders every one of them (and
FastAPI's own request validation errors) as ``{"error": code, "field": name|null, "message": text}``
so a client always learns which field was wrong.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse


class DomainError(Exception):
    status: int = 400
    code: str = "bad_request"
    headers: dict[str, str] | None = None  # extra response headers, e.g. Retry-After

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict:
        return {"error": self.code, "field": self.field, "message": self.message}


class InvalidField(DomainError):
    status = 422
    code = "invalid_field"

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


class BadRequest(DomainError):
    status = 400
    code = "bad_request"


class TooManyRequests(DomainError):
    """Login limits and a full password-hashing queue: retry after ``retry_after_s``."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int, field: str | None = None):
        super().__init__(message, field)
        self.headers = {"Retry-After": str(retry_after_s)}


class NotFound(DomainError):
    status = 404
    code = "not_found"

    def __init__(self, what: str):
        super().__init__(f"{what} not found")


class Conflict(DomainError):
    status = 409
    code = "conflict"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class BodyTooLarge(DomainError):
    status = 413
    code = "body_too_large"

    def __init__(self, message: str):
        super().__init__(message, "body")


class QueryRefused(DomainError):
    """An analyst's SQL was refused before or by ClickHouse (not allowed, invalid, too big)."""

    status = 400
    code = "query_refused"

    def __init__(self, message: str, reason: str = "clickhouse"):
        super().__init__(message, "sql")
        self.reason = reason  # a short label for metrics: statement, clause, table, function, ...


class QueryFailed(DomainError):
    """ClickHouse accepted an analyst's statement but could not run it (unknown column, timeout...)."""

    status = 400
    code = "query_failed"

    def __init__(self, message: str):
        super().__init__(message, "sql")


class TooManyQueries(DomainError):
    """A tenant already runs as many SQL statements at once as it may."""

    status = 429
    code = "too_many_queries"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, "sql")
        self.headers = {"Retry-After": str(retry_after_s)}


class UpstreamUnavailable(DomainError):
    status = 503
    code = "clickhouse_unavailable"


_CH_CODE = re.compile(r"Code: (\d+)\.")
_CH_TRAILER = re.compile(r"(?:[. ]*\((?:version [^)]*|for url [^)]*|[A-Z_]+)\))+[. ]*$")


def clickhouse_message(exc: Exception) -> tuple[int | None, str]:
    """(error code, the message a person needs) from a clickhouse-connect exception's text.

    The server nests "Code: N. DB::Exception:" prefixes and appends version/URL trailers; only
    the innermost message and the error name are kept.
    """
    text = str(exc)
    code = _CH_CODE.search(text)
    marker = text.rfind("DB::Exception: ")
    message = text[marker + len("DB::Exception: ") :] if marker != -1 else text
    names = re.findall(r"\(([A-Z_]{3,})\)", message)
    message = _CH_TRAILER.sub("", message).strip()
    if names:
        message += f" ({names[-1]})"
    return (int(code.group(1)) if code else None), message


def _loc_to_field(loc: tuple) -> str | None:
    # FastAPI prefixes the source ("query", "body", "path", "header"); the client only knows names.
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in ("query", "body", "path", "header", "cookie")
        else [str(p) for p in loc]
    )
    # a body that is not an object at all (a list, a number) has only "body" to name
    return ".".join(parts) or (str(loc[0]) if loc else None)


def domain_response(exc: DomainError) -> JSONResponse:
    """The HTTP answer of a domain error (also sent by the request guard, outside FastAPI's handlers)."""
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else exc.headers
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    # imported here so the pure modules (filters, logic) can raise these errors without the web stack
    from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return domain_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _loc_to_field(tuple(first.get("loc", ())))
        message = f"{field}: {first['msg']}" if field else first["msg"]
        details = [{"field": _loc_to_field(tuple(e.get("loc", ()))), "message": e["msg"]} for e in errors]
        return JSONResponse(
            {"error": "invalid_field", "field": field, "message": message, "details": details}, status_code=422
        )

    # ClickHouse failures no router turned into a domain error: down (503) or refusing (502)
    @app.exception_handler(OperationalError)
    async def _clickhouse_down(_: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse(
            {"error": "clickhouse_unavailable", "field": None, "message": "ClickHouse is not reachable; retry shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(ClickHouseError)
    async def _clickhouse_error(_: Request, exc: ClickHouseError) -> JSONResponse:
        return JSONResponse(
            {"error": "clickhouse_error", "field": None, "message": clickhouse_message(exc)[1]}, status_code=502
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # FastAPI's answer to a body it cannot decode at all (not JSON, not UTF-8): the body is at fault
        field = "body" if exc.status_code == 400 and "parsing the body" in str(exc.detail) else None
        return JSONResponse(
            {"error": code, "field": field, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
