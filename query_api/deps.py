"""FastAPI dependencies shared by every router (also the budgets/webhooks/alerts routers).

    @router.get("/v1/things")
    async def things(principal: Annotated[Principal, Depends(require("read"))], ch: CH, settings: SettingsDep):
        ...  # principal.tenant scopes every query

The lifespan in ``query_api.app`` owns the objects these hand out (``app.state.ch``,
``app.state.settings``, ``app.state.keys``).
"""

from __future__ import annotations

from typing import Annotated, Awaitable, Callable

from clickhouse_connect.driver.asyncclient import AsyncClient
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from query_api.errors import Forbidden, Unauthorized
from spendstream.keys import KeyStore, Principal
from spendstream.settings import Settings

__all__ = ["CH", "Admin", "KeysDep", "Principal", "Reader", "SettingsDep", "get_ch", "get_keys", "get_settings", "require"]

# Both schemes are declared so the OpenAPI page offers them; the gateway accepts the same two.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
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


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency: the caller's principal, after checking it holds ``scope``.

    As at the gateway, a key has exactly the scopes it lists (the bootstrap admin key has all).
    """

    async def dependency(
        keys: KeysDep,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Principal:
        secret = bearer.credentials if bearer else api_key
        if not secret:
            raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
        principal = await keys.authenticate(secret)
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        if not principal.allows(scope):
            raise Forbidden(f"this key lacks the '{scope}' scope")
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency


#: the principal of a key with the ``read`` / ``admin`` scope
Reader = Annotated[Principal, Depends(require("read"))]
Admin = Annotated[Principal, Depends(require("admin"))]
