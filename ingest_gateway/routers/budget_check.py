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
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ingest_gateway.budget_view import BudgetView
from ingest_gateway.errors import GatewayError, to_http
from ingest_gateway.http import json_response
from ingest_gateway.ingest import authenticate, read_body
from ingest_gateway.logic import normalise_names
from spendstream.asgi import ClientGone
from spendstream.budgets import Attribution
from spendstream.contracts import nanos_to_usd_str
from spendstream.money import ESTIMATED_COST, format_usd

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
    estimated_cost_usd: str | int | float = Field(
        "0", description=f"decimal USD the next call may cost, 0 to {format_usd(ESTIMATED_COST.max_nanos)}"
    )

    @field_validator("estimated_cost_usd")
    @classmethod
    def _estimate(cls, v: str | int | float) -> str | int | float:
        ESTIMATED_COST.nanos(v)
        return v

    def estimate_nanos(self) -> int:
        return ESTIMATED_COST.nanos(self.estimated_cost_usd)

    def attribution(self) -> Attribution:
        s = self.scope
        provider, model = normalise_names(s.provider or None, s.model)
        return Attribution(s.project, s.agent, s.user, provider or "", model, s.tags)


class NotReady(GatewayError):
    status = 503
    code = "budgets_not_ready"
    retry_after_s = 1


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
        "Budgets created or changed take effect within `budgets.reload_s` (1 s by default). "
        "503 `budgets_not_ready` (with Retry-After) until the budgets and the state topic are loaded after a "
        "start. With `enforce`, `allowed` is false once spent reaches the limit or spent + estimate exceeds it."
    ),
    responses={401: {}, 403: {}, 413: {}, 422: {}, 503: {"description": "budget state still loading"}},
)
async def check_budget(request: Request) -> Any:
    # the headers are read here, not declared as FastAPI dependencies: resolving one costs more CPU
    # than the whole answer from memory (Authorization: Bearer <API key>, scope ingest or read).
    # The key is checked before the body is read, and the body is read under its limit.
    try:
        principal = await authenticate(
            request.app.state.keys, request.headers.get("authorization"), request.headers.get("x-api-key"), *SCOPES
        )
        view: BudgetView = request.app.state.budget_view
        if not view.ready:
            raise NotReady("budgets and budget state are still being loaded")
        limit = request.app.ingest_settings.gateway.max_check_body_bytes
        raw = await read_body(request.receive, request.headers.get("content-length"), limit)
    except GatewayError as exc:
        return _error(exc)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody is left to read it
    try:
        body = CheckIn.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"  # malformed JSON: the body as a whole
        return json_response({"error": "invalid_field", "field": field, "message": f"{field}: {first['msg']}"}, 422)
    estimate = body.estimate_nanos()
    allowed, standings = view.check(principal.tenant, body.attribution(), estimate, time.time_ns() // 1_000_000)
    return json_response({
        "allowed": allowed,
        "estimated_cost_usd": nanos_to_usd_str(estimate),
        "budgets": [{**s.to_json(), "allowed": s.allows(estimate)} for s in standings],
    })  # fmt: skip
