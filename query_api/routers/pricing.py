"""Prices: the catalog, the effective price of a model at an instant, tenant overrides, and the
models seen without a price. Pricing itself is ``spendstream.pricing``; this router stores
overrides in ClickHouse ``price_overrides`` (the pricing stage reloads them) and reads them back.

``price_overrides`` replaces rows by its sorting key (tenant, provider, model, id), not by id. So
a PUT of an existing id that moves it to another provider or model also writes a ``deleted``
row under every old key, and DELETE writes one under every key the id has; both in the one
insert, with a version above every row they replace (write time in µs, or the stored version
+ 1 if a clock is behind), so the change is whole whichever way the clocks stand.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from query_api.deps import CH, Admin, Reader
from query_api.errors import InvalidField, NotFound
from query_api.filters import parse_instant, parse_tz
from query_api.routers.reprice import propose_after_override_change
from spendstream.money import PRICE_PER_MTOK, PRICE_PER_REQUEST, format_usd
from spendstream.pricing.catalog import Catalog
from spendstream.pricing.logic import effective_price, list_prices
from spendstream.pricing.overrides import PRICE_COLUMNS, OverrideBook, PriceOverride, TenantOverrides
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/pricing", tags=["pricing"])

#: price_overrides columns, read back under the names PriceOverride.from_row expects
_OVERRIDE_SELECT = (
    "SELECT id, tenant, provider, model, effective_from, effective_to, "
    + ", ".join(PRICE_COLUMNS.values())
    + ", request_usd AS per_request_usd, note, created_at FROM price_overrides FINAL"
    " WHERE tenant = {tenant:String} AND deleted = 0"
)
#: every key (provider, model) an id is stored under, with its version
_ID_KEYS = (
    "SELECT provider, model, effective_from, version FROM price_overrides FINAL"
    " WHERE tenant = {tenant:String} AND id = {id:String} AND deleted = 0"
)
_WRITE_COLUMNS = [
    "tenant", "id", "provider", "model", "effective_from", "effective_to", *PRICE_COLUMNS.values(),
    "request_usd", "note", "created_at", "deleted", "version",
]  # fmt: skip


def get_catalog(request: Request) -> Catalog:
    """The genai-prices catalog the lifespan compiled."""
    return request.app.state.catalog


CatalogDep = Annotated[Catalog, Depends(get_catalog)]


async def tenant_override_rows(ch: CH, tenant: str) -> list[dict[str, Any]]:
    result = await ch.query(
        _OVERRIDE_SELECT + " ORDER BY provider, model, effective_from", parameters={"tenant": tenant}
    )
    return list(result.named_results())


async def tenant_overrides(ch: CH, tenant: str, catalog: Catalog) -> TenantOverrides:
    book = OverrideBook.from_rows(await tenant_override_rows(ch, tenant), catalog)
    return book.for_tenant(tenant)


@router.get("", summary="The price catalog (USD per million tokens, decimal strings) and your overrides")
async def prices(
    principal: Reader,
    ch: CH,
    catalog: CatalogDep,
    provider: Annotated[str | None, Query(description="only this catalog provider id")] = None,
) -> dict:
    models = list_prices(catalog)
    if provider:
        models = [m for m in models if m["provider_id"] == provider]
    overrides = [_describe(r) for r in await tenant_override_rows(ch, principal.tenant)]
    return {"catalog": catalog.source, "models": models, "overrides": overrides}


@router.get("/overrides", summary="Your price overrides")
async def overrides(principal: Reader, ch: CH) -> dict:
    rows = await tenant_override_rows(ch, principal.tenant)
    return {"overrides": [_describe(r) | {"note": r["note"]} for r in rows]}


def _describe(row: dict[str, Any]) -> dict[str, Any]:
    try:
        return PriceOverride.from_row(row).describe()
    except ValueError as exc:
        # a row stored before today's limits: the pricing stage ignores it, the list says why
        return {"id": row["id"], "provider": row["provider"], "model": row["model"], "rejected": str(exc)}


class OverrideIn(BaseModel):
    id: str | None = Field(None, max_length=128, description="an existing override's id replaces it; absent = new")
    provider: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=256)
    effective_from: str = Field(description="RFC 3339; events at or after it use this price")
    effective_to: str | None = Field(None, description="RFC 3339, exclusive; absent = open-ended")
    per_mtok: dict[str, str] = Field(
        default_factory=dict,
        max_length=len(PRICE_COLUMNS),
        description="USD per million tokens as decimal strings (at most 9 decimal places, "
        f"0 to {format_usd(PRICE_PER_MTOK.max_nanos)}), by class: " + ", ".join(PRICE_COLUMNS),
    )
    per_request_usd: str | None = Field(
        None, description=f"USD per request, decimal string (0 to {format_usd(PRICE_PER_REQUEST.max_nanos)})"
    )
    note: str = Field("", max_length=1000)


def _validated(body: OverrideIn, tenant: str, override_id: str) -> PriceOverride:
    utc = parse_tz("UTC")
    start = parse_instant("effective_from", body.effective_from, utc, end_of_day=False)
    end = parse_instant("effective_to", body.effective_to, utc, end_of_day=False) if body.effective_to else None
    row = {
        "id": override_id,
        "tenant": tenant,
        "provider": body.provider,
        "model": body.model,
        "effective_from": start,
        "effective_to": end,
        "per_request_usd": body.per_request_usd,
    }
    unknown = set(body.per_mtok) - set(PRICE_COLUMNS)
    if unknown:
        raise InvalidField("per_mtok", f"unknown token classes {sorted(unknown)}; known: {', '.join(PRICE_COLUMNS)}")
    row |= {PRICE_COLUMNS[atom]: value for atom, value in body.per_mtok.items()}
    try:
        return PriceOverride.from_row(row)
    except ValueError as exc:
        message = str(exc)
        field = getattr(exc, "field", None) or next(
            (f for f in ("effective_to", "per_request_usd", *PRICE_COLUMNS.values()) if f in message), "per_mtok"
        )
        raise InvalidField(field, message) from None


async def _stored_keys(ch: CH, tenant: str, override_id: str) -> list[dict[str, Any]]:
    result = await ch.query(_ID_KEYS, parameters={"tenant": tenant, "id": override_id})
    return list(result.named_results())


def _next_version(now: datetime, stored: list[dict[str, Any]]) -> int:
    # the schema's convention is the write time in µs; above every stored version so the write
    # wins even when this replica's clock is behind the one that wrote them
    return max([int(now.timestamp() * 1_000_000), *(int(r["version"]) + 1 for r in stored)])


def _tombstone(tenant: str, override_id: str, key: dict[str, Any], now: datetime, version: int) -> list[Any]:
    return [
        tenant, override_id, key["provider"], key["model"], key["effective_from"], None,
        *(None for _ in PRICE_COLUMNS), None, "", now, 1, version,
    ]  # fmt: skip


@router.put(
    "/overrides", summary="Create or replace a price override (admin); the pricing stage picks it up within seconds"
)
async def put_override(body: OverrideIn, principal: Admin, ch: CH, request: Request) -> dict:
    override = _validated(body, principal.tenant, body.id or uuid.uuid4().hex)
    stored = await _stored_keys(ch, override.tenant, override.id) if body.id else []
    now = datetime.now(UTC)
    version = _next_version(now, stored)
    given = {PRICE_COLUMNS[a]: v for a, v in override.per_mtok.items()}
    rows = [[
        override.tenant, override.id, override.provider, override.model, override.effective_from,
        override.effective_to, *(given.get(c) for c in PRICE_COLUMNS.values()), override.per_request,
        body.note, now, 0, version,
    ]]  # fmt: skip
    rows += [
        _tombstone(override.tenant, override.id, key, now, version)
        for key in stored
        if (key["provider"], key["model"]) != (override.provider, override.model)
    ]
    await ch.insert("price_overrides", rows, column_names=_WRITE_COLUMNS)
    # stored costs from the earliest start involved on may change: propose a re-price (docs/repricing.md)
    since = min([override.effective_from, *(_utc(k["effective_from"]) for k in stored)])
    proposal = await propose_after_override_change(request, principal, override.id, since, "changed")
    return override.describe() | {"note": body.note} | ({"reprice": proposal} if proposal else {})


@router.delete("/overrides/{override_id}", status_code=204, summary="Delete a price override (admin)")
async def delete_override(override_id: str, principal: Admin, ch: CH, request: Request) -> None:
    stored = await _stored_keys(ch, principal.tenant, override_id)
    if not stored:
        raise NotFound(f"price override {override_id!r}")
    now = datetime.now(UTC)
    version = _next_version(now, stored)
    rows = [_tombstone(principal.tenant, override_id, key, now, version) for key in stored]
    await ch.insert("price_overrides", rows, column_names=_WRITE_COLUMNS)
    since = min(_utc(k["effective_from"]) for k in stored)
    await propose_after_override_change(request, principal, override_id, since, "deleted")


def _utc(instant: datetime) -> datetime:
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant


@router.get("/unpriced", summary="Models seen without a price, with event counts and the time range to re-price")
async def unpriced(principal: Reader, ch: CH, catalog: CatalogDep) -> dict:
    result = await ch.query(
        "SELECT provider, model, sum(events) AS events, min(first_seen) AS first_seen, max(last_seen) AS last_seen "
        "FROM unpriced_models WHERE tenant = {tenant:String} GROUP BY provider, model "
        # a model whose events were all re-priced sums to 0 (0017_repricing.sql)
        "HAVING events > 0 ORDER BY events DESC, provider, model",
        parameters={"tenant": principal.tenant},
    )
    overrides_now = await tenant_overrides(ch, principal.tenant, catalog)
    models = []
    for r in result.named_results():
        now_price = effective_price(catalog, overrides_now, r["provider"], r["model"])
        models.append(
            {
                "provider": r["provider"],
                "model": r["model"],
                "events": int(r["events"]),
                "first_seen": iso_utc(r["first_seen"]),
                "last_seen": iso_utc(r["last_seen"]),
                # a price added since (override or newer catalog) makes the range ready to re-price
                "priced_now": now_price["price_source"] != "none",
            }
        )
    return {"models": models}


@router.get("/{provider}/{model:path}", summary="The price an event of this model gets now, or at `at`")
async def price_of(
    principal: Reader,
    ch: CH,
    catalog: CatalogDep,
    provider: Annotated[str, Path()],
    model: Annotated[str, Path(description="may contain '/', e.g. an OpenRouter id")],
    at: Annotated[str | None, Query(description="RFC 3339 or YYYY-MM-DD; default now")] = None,
) -> dict:
    instant = parse_instant("at", at, parse_tz("UTC"), end_of_day=False) if at else datetime.now(UTC)
    return effective_price(catalog, await tenant_overrides(ch, principal.tenant, catalog), provider, model, instant)
