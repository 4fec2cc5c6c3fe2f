"""``/proxy/openai/v1/{path}`` and ``/proxy/anthropic/v1/{path}``: the AI API proxy (docs/proxy.md).

Point the SDKs' base URL here (OpenAI: ``<gateway>/proxy/openai/v1``; Anthropic:
``<gateway>/proxy/anthropic``) and use the Spendstream API key as the SDK's API key (the tenant's
stored provider key goes upstream), or keep your own provider key and add the Spendstream key in
``X-Spendstream-Key``. The work is in ingest_gateway/proxy/service.py. The gateway serves these
paths in front of FastAPI's stack (``service.ProxyFrontDoor``); the routes here describe them in the
OpenAPI document and serve them all the same where the front door is not installed.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ingest_gateway.proxy.service import ProxyCall

router = APIRouter(tags=["proxy"])

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_DESCRIPTION = (
    "Forwarded to the provider's API (`proxy.openai_base_url` / `proxy.anthropic_base_url`) as it arrives, "
    "streams included; every call becomes one usage event on usage.raw, priced by the pipeline. Hard budgets "
    "(`enforce: true`) are checked before forwarding: a denied call gets HTTP 402 in the provider's error "
    "shape (type `budget_exceeded`) with `x-should-retry: false`. Attribution headers: X-Spendstream-Project, "
    "-Agent, -User, -Session, -Tags (`k=v,k2=v2`)."
)


async def openai(path: str, request: Request) -> Response:
    return ProxyCall(request.app.state.proxy, "openai")


async def anthropic(path: str, request: Request) -> Response:
    return ProxyCall(request.app.state.proxy, "anthropic")


# one route per method: each needs its own OpenAPI operation id
for _method in _METHODS:
    for _name, _title, _endpoint in (("openai", "OpenAI", openai), ("anthropic", "Anthropic", anthropic)):
        router.add_api_route(
            f"/proxy/{_name}/v1/{{path:path}}",
            _endpoint,
            methods=[_method],
            operation_id=f"proxy_{_name}_{_method.lower()}",
            summary=f"{_title} API proxy",
            description=_DESCRIPTION,
            # any status: the provider's own answers pass through, the proxy's refusals are in its shape
            responses={
                "default": {
                    "description": "the provider's answer, or the proxy's refusal in the provider's error shape"
                }
            },
        )
