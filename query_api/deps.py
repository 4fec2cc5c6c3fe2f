"""FastAPI dependencies shared by every router (also the budgets/webhooks/alerts routers).

    @router.get("/v1/things")
    async def things(principal: Annotated[Principal, Depends(require("read"))], ch: CH, settings: SettingsDep):
        ...  # principal.tenant scopes every query

The lifespan in ``query_api.app`` owns the objects these hand out (``app.state.ch``,
``app.state.settings``, ``app.state.keys``). The API key itself is checked before FastAPI sees the
request, by ``query_api.guard``; ``require`` then checks its scope.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

from clickhouse_connect.driver.asyncclient import AsyncClient
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from query_api.errors import BadRequest, DomainError, Forbidden, Unauthorized
from query_api.identity import Identity
from spendstream.identity.cache import authenticate_user
from spendstream.identity.tokens import looks_like_jwt
from spendstream.keys import AuthError, KeyStore, Principal, authenticate, check_scopes, presented_key
from spendstream.settings import Settings

__all__ = [
    "CH", "Admin", "KeyManager", "KeysDep", "PRINCIPAL", "Principal", "Reader", "SettingsDep", "authenticate_request",
    "get_ch", "get_keys", "get_settings", "require",
]  # fmt: skip

#: where the request guard leaves the authenticated principal in the ASGI scope
PRINCIPAL = "spendstream.principal"
#: the organisation a path is about, which a person's token then acts in
_ORG_PATH = re.compile(r"^/v1/orgs/([^/]+)")

# Both schemes are declared so the OpenAPI page offers them; the gateway accepts the same two.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key or a person's access token>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key itself")


def get_ch(request: Request) -> AsyncClient:
    return request.app.state.ch


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


CH = Annotated[AsyncClient, Depends(get_ch)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeysDep = Annotated[KeyStore, Depends(get_keys)]


def _domain_error(exc: AuthError) -> DomainError:
    if exc.status == 400:
        return BadRequest(exc.message, exc.field)
    return Unauthorized(exc.message) if exc.status == 401 else Forbidden(exc.message)


def _org_in_path(path: str) -> str | None:
    m = _ORG_PATH.match(path)
    return m.group(1) if m else None


async def authenticate_request(
    keys: KeyStore, headers: Mapping[str, str], identity: Identity | None = None, path: str = ""
) -> Principal:
    """The principal of a request's credential, else Unauthorized (or Forbidden).

    ``Authorization: Bearer`` / ``X-API-Key`` with an API key, or ``Authorization: Bearer`` with
    a person's access token (a JWT), which acts in the organisation of ``/v1/orgs/{id}/...`` or
    ``X-Org-Id`` (spendstream.identity.cache.authenticate_user). Both give the same Principal.
    """
    try:
        token = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        if identity is not None and token is not None and looks_like_jwt(token):
            return await authenticate_user(
                identity.cache, identity.access_tokens, token, headers.get("x-org-id"), _org_in_path(path)
            )
        return await authenticate(keys, headers.get("authorization"), headers.get("x-api-key"))
    except AuthError as exc:
        raise _domain_error(exc) from None


def require(*scopes: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency: the caller's principal, after checking it holds one of ``scopes``.

    As at the gateway, a key has exactly the scopes it lists (the bootstrap admin key has all).
    ``bearer`` and ``api_key`` only declare the schemes in OpenAPI: the guard has read the key.
    """

    async def dependency(
        request: Request,
        keys: KeysDep,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Principal:
        # a route outside the guard's paths authenticates here, so none is ever left open
        principal = request.scope.get(PRINCIPAL) or await authenticate_request(
            keys, request.headers, getattr(request.app.state, "identity", None), request.url.path
        )
        try:
            return check_scopes(principal, scopes)
        except AuthError as exc:
            raise _domain_error(exc) from None

    dependency.__name__ = "require_" + "_or_".join(scopes)
    return dependency


#: the principal of a key with the ``read`` / ``admin`` scope
Reader = Annotated[Principal, Depends(require("read"))]
Admin = Annotated[Principal, Depends(require("admin"))]
#: the principal of an admin, or of one who may manage the keys they created (``keys`` scope)
KeyManager = Annotated[Principal, Depends(require("admin", "keys"))]
