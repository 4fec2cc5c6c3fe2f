"""``POST /v1/budgets/check``: may an agent spend (about) this much now? Answered from memory.

Body: ``{"scope": {"project", "agent", "user", "provider", "model", "tags": {...}}, "estimated_cost_usd": "0.10"}``
(every field optional). The scope is the attribution the agent's next call would carry, matched
like an event: a budget applies when each of its scope fields equals the call's (``agent``
defaults to ``default`` and provider/model are normalised, as for events). ``allowed`` is false
when an enforced budget is exhausted, or would be by the estimate.

The route's description (OpenAPI) states what the answer reflects and how fresh it is; the view
behind it is ingest_gateway/budget_view.py.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ingest_gateway.budget_view import BudgetView
from ingest_gateway.errors import Forbidden, GatewayError, Unauthenticated, to_http
from ingest_gateway.http import json_response
from ingest_gateway.logic import normalise_names
from spendstream.contracts import nanos_to_usd_str, usd_to_nanos
from stream_processors.budgets.logic import Attribution

router = APIRouter(tags=["budgets"])

SCOPES = ("ingest", "read")


class CheckScope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = ""
    agent: str = "default"
    user: str = ""
    provider: str = ""
    model: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: CheckScope = Field(default_factory=CheckScope)
    estimated_cost_usd: str | int | float = Field("0", description="decimal USD the next call may cost")

    @field_validator("estimated_cost_usd")
    @classmethod
    def _estimate(cls, v: str | int | float) -> str | int | float:
        try:
            d = Decimal(v.strip() if isinstance(v, str) else repr(v))
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
        if not d.is_finite() or d < 0:
            raise ValueError("must be a decimal number >= 0")
        return v

    def attribution(self) -> Attribution:
        s = self.scope
        provider, model = normalise_names(s.provider or None, s.model)
        return Attribution(s.project, s.agent, s.user, provider or "", model, s.tags)


class NotReady(GatewayError):
    status = 503
    code = "budgets_not_ready"
    retry_after_s = 1


async def _principal(request: Request, authorization: str | None):
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise Unauthenticated("send Authorization: Bearer <API key>")
    principal = await request.app.state.keys.authenticate(authorization[7:].strip())
    if principal is None:
        raise Unauthenticated("unknown or revoked API key")
    if not any(principal.allows(s) for s in SCOPES):
        raise Forbidden("this API key needs the 'ingest' or 'read' scope")
    return principal


def _error(exc: GatewayError) -> Response:
    status, body, headers = to_http(exc)
    return json_response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


@router.post(
    "/v1/budgets/check",
    summary="May an agent spend now? (from the in-memory budget state)",
    description=(
        "Answered from this gateway's memory, without a database or broker round trip. "
        "`spent_usd` is exact (integer nano-USD, as decimal strings): the spend the budgets stage last "
        "published for the budget's current window on `spendstream.budget.state`. It trails the events "
        "already acknowledged by the gateway by the pipeline's latency (under a second while the stages "
        "keep up; longer if they lag or are down, in which case the last published spend is served). "
        "Budgets created or changed take effect within `processors.budgets_reload_s` (1 s by default). "
        "503 `budgets_not_ready` (with Retry-After) until the budgets and the state topic are loaded after a "
        "start. With `enforce`, `allowed` is false once spent reaches the limit or spent + estimate exceeds it."
    ),
    responses={401: {}, 403: {}, 422: {}, 503: {"description": "budget state still loading"}},
)
async def check_budget(request: Request) -> Any:
    # the header is read here, not declared as a FastAPI dependency: resolving one costs more CPU
    # than the whole answer from memory (Authorization: Bearer <API key>, scope ingest or read)
    try:
        principal = await _principal(request, request.headers.get("authorization"))
        view: BudgetView = request.app.state.budget_view
        if not view.ready:
            raise NotReady("budgets and budget state are still being loaded")
    except GatewayError as exc:
        return _error(exc)
    try:
        body = CheckIn.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        return json_response({"error": "invalid_field", "field": field, "message": f"{field}: {first['msg']}"}, 422)
    estimate = usd_to_nanos(body.estimated_cost_usd)
    allowed, standings = view.check(principal.tenant, body.attribution(), estimate, time.time_ns() // 1_000_000)
    return json_response({
        "allowed": allowed,
        "estimated_cost_usd": nanos_to_usd_str(estimate),
        "budgets": [{**s.to_json(), "allowed": s.allows(estimate)} for s in standings],
    })  # fmt: skip
