"""Pricing of one normalised event: exact integer nano-USD, never float. Pure: no IO.

Rounding (the contract every consumer may rely on)
--------------------------------------------------
* The total is the exact rational cost rounded once, half to even, to a whole nano-USD. For
  catalog prices that is ``round_half_even(calc_price(...).total_price * 1e9)`` of genai-prices
  whenever genai-prices' own Decimal arithmetic (28 significant digits) is exact, i.e. for every
  realistic event (the tests check counts up to 10^8 tokens per class).
* The breakdown by :data:`~spendstream.contracts.COST_CLASSES` always sums to the total. Each
  class gets the floor of its exact share and the nanos still missing go, one each, to the classes
  with the largest remainders (ties in ``COST_CLASSES`` order), so no class is more than one
  nano-USD away from its exact cost. Rows whose rates are whole nanos per token skip this step.
* A class is what those tokens cost, whatever price applies to them: reasoning tokens of a model
  without a reasoning price are booked under ``reasoning`` at the output price.
* A client price (``cost_usd``) is kept exactly (``contracts.usd_to_nanos``) and split across the
  classes in proportion to what the catalog or an override would have charged, with the same
  remainder rule; when there is nothing to be proportional to it is booked under ``request``.

Errors: an unknown model is never an error (``pricing_status='unknown_model'``, cost 0).
:class:`PricingError` is raised only for events that break contract v1 (missing provider/model,
token counts that are not non-negative integers or exceed ``MAX_TOKENS_PER_EVENT``, parts larger
than their whole such as ``cache_read + cache_write + input_audio > input_tokens``, an unusable
timestamp, or a ``cost_usd`` the gateway's rule ``money.EVENT_COST`` refuses, which includes one
above ``MAX_EVENT_COST_NANOS``); the stage sends those to the dead-letter topic with the message
as reason. The gateway refuses all of these with a 4xx, so they come only from other producers.

Cost cap: a catalog or override price that makes one event cost more than
``MAX_EVENT_COST_NANOS`` (10^15 nano-USD, 1,000,000 USD; spendstream/money.py) is not the event's
fault but the price's (with tokens within their cap only an override priced far beyond
``MAX_PRICE_PER_MTOK_NANOS`` gets there). Such an event is kept, like an unknown model, with
``pricing_status='cost_over_cap'``, cost 0 and the ``price_id``/``price_source`` that produced
the cost, so it is counted and visible (and can be re-priced once the price is fixed) instead of
carrying an amount that would overflow every sum downstream.
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import UTC, datetime
from typing import Any, NamedTuple

from spendstream.contracts import COST_CLASSES
from spendstream.money import EVENT_COST, MAX_EVENT_COST_NANOS, MAX_TOKENS_PER_EVENT, MoneyError
from spendstream.pricing.catalog import Catalog, PriceRow, Resolution
from spendstream.pricing.normalize import epoch_micros, utc_date_str, utc_instant
from spendstream.pricing.overrides import TenantOverrides, active_override

# price() spells the breakdown out for speed; fail at import if the contract changes the classes
_CLASS_ORDER = ("input", "output", "cache_read", "cache_write", "reasoning", "input_audio", "output_audio", "request")
if COST_CLASSES != _CLASS_ORDER:
    raise ImportError(f"contracts.COST_CLASSES changed to {COST_CLASSES}; update spendstream.pricing.logic.price")


#: contracts.PRICING_STATUSES: the computed cost exceeded MAX_EVENT_COST_NANOS (see above)
COST_OVER_CAP = "cost_over_cap"


class PricingError(ValueError):
    """The event breaks contract v1; the message is the dead-letter reason."""


class PricedLine(NamedTuple):
    cost: dict[str, int]  # COST_CLASSES -> nano-USD, sums to cost_nanos
    cost_nanos: int
    price_id: str  # catalog "provider/model@start[>tier]", "override:<id>", "client" or "" (unknown)
    pricing_status: str  # contracts.PRICING_STATUSES
    price_source: str  # contracts.PRICE_SOURCES

    def event_fields(self) -> dict[str, Any]:
        """The PricedEvent fields to merge into the normalised event (spelled out: NamedTuple's
        ``_asdict`` was a fifth of the pricing stage's profile)."""
        cost, cost_nanos, price_id, pricing_status, price_source = self
        return {"cost": cost, "cost_nanos": cost_nanos, "price_id": price_id,
                "pricing_status": pricing_status, "price_source": price_source}  # fmt: skip


#: builds a PricedLine without NamedTuple's Python-level __new__ (a third of the hot path's overhead)
_new_line = tuple.__new__


def round_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient & 1):
        quotient += 1
    return quotient


def allocate(numerators: list[int], denominator: int, total: int) -> list[int]:
    """Whole shares of ``numerators/denominator`` summing to ``total`` (largest remainder first)."""
    shares = [n // denominator for n in numerators]
    missing = total - sum(shares)
    if missing:
        order = sorted(range(len(numerators)), key=lambda i: (-(numerators[i] % denominator), i))
        for i in order[:missing]:
            shares[i] += 1
    return shares


def _zero_cost() -> dict[str, int]:
    return dict.fromkeys(COST_CLASSES, 0)


def _event_micros(event: dict[str, Any]) -> int:
    try:
        return epoch_micros(utc_instant(event["timestamp"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise PricingError(f"timestamp missing or not RFC 3339: {event.get('timestamp')!r}") from exc


def _catalog_row(resolution: Resolution, event: dict[str, Any]) -> PriceRow | None:
    model = resolution.model
    if model is None:
        return None
    schedule = model.schedule
    if schedule.fixed is not None:
        return schedule.fixed
    timestamp = event.get("timestamp")
    try:
        return schedule.row_at(utc_date_str(timestamp), timestamp)
    except (TypeError, ValueError) as exc:
        raise PricingError(f"timestamp missing or not RFC 3339: {timestamp!r}") from exc


def price(event: dict[str, Any], catalog: Catalog, overrides: TenantOverrides | None = None) -> PricedLine:
    """Price one contract-v1 event at its own timestamp.

    ``overrides`` are the event's tenant's (``OverrideBook.for_tenant(tenant)``): events carry no
    tenant, their envelope does.
    """
    get = event.get
    try:
        resolution = catalog.resolve(event["provider"], event["model"])
        input_tokens = get("input_tokens") or 0
        cache_read = get("cache_read_tokens") or 0
        cache_write = get("cache_write_tokens") or 0
        cache_write_1h = get("cache_write_1h_tokens") or 0
        input_audio = get("input_audio_tokens") or 0
        output_tokens = get("output_tokens") or 0
        reasoning = get("reasoning_tokens") or 0
        output_audio = get("output_audio_tokens") or 0
        plain_input = input_tokens - cache_read - cache_write - input_audio
        cache_write_5m = cache_write - cache_write_1h
        plain_output = output_tokens - reasoning - output_audio
    except KeyError as exc:
        raise PricingError(f"{exc.args[0]} is required") from None
    except (TypeError, AttributeError) as exc:
        raise PricingError(f"provider, model and token counts have the wrong type: {exc}") from None
    parts = (
        plain_input,
        cache_read,
        cache_write_5m,
        cache_write_1h,
        input_audio,
        plain_output,
        reasoning,
        output_audio,
    )
    if min(parts) < 0:
        raise PricingError(
            "token counts must be >= 0 and fit their parents: cache_read + cache_write + input_audio <= input_tokens, "
            "cache_write_1h <= cache_write, reasoning + output_audio <= output_tokens"
        )
    # every other count is a part of these two (checked above)
    if input_tokens > MAX_TOKENS_PER_EVENT or output_tokens > MAX_TOKENS_PER_EVENT:
        raise PricingError(f"token counts must be <= {MAX_TOKENS_PER_EVENT} per field")

    row = None
    source = "catalog"
    if overrides:
        windows = overrides.windows_for(resolution)
        if windows and (hit := active_override(windows, _event_micros(event))) is not None:
            row = hit.row
            source = "override"
    if row is None:
        row = _catalog_row(resolution, event)

    cost_usd = get("cost_usd")
    if row is None:
        if cost_usd is None:
            return PricedLine(_zero_cost(), 0, "", "unknown_model", "none")
        return _client_line(cost_usd, None)

    # the number of tier starts strictly below input_tokens: "input_tokens > start" selects a tier
    band = bisect_left(row.thresholds, input_tokens) if row.thresholds else 0
    r = row.bands[band]  # ATOMS order, then the request rate
    c_input = plain_input * r[0]
    c_output = plain_output * r[5]
    c_cache_read = cache_read * r[1]
    c_cache_write = cache_write_5m * r[2] + cache_write_1h * r[3]
    c_reasoning = reasoning * r[6]
    c_input_audio = input_audio * r[4]
    c_output_audio = output_audio * r[7]
    c_request = r[8]
    exact = c_input + c_output + c_cache_read + c_cache_write + c_reasoning + c_input_audio + c_output_audio + c_request
    if type(exact) is not int:  # noqa: E721 - a float or Decimal count would silently lose exactness
        raise PricingError("token counts must be integers")
    price_id = row.price_id if band == 0 else f"{row.price_id}>{row.thresholds[band - 1]}"
    if row.scale == 1 and cost_usd is None:
        # whole nanos per token: exact already (a dict literal is several times faster than dict(zip()))
        if exact > MAX_EVENT_COST_NANOS:
            return _over_cap_line(price_id, source)
        cost = {
            "input": c_input,
            "output": c_output,
            "cache_read": c_cache_read,
            "cache_write": c_cache_write,
            "reasoning": c_reasoning,
            "input_audio": c_input_audio,
            "output_audio": c_output_audio,
            "request": c_request,
        }
        return _new_line(PricedLine, (cost, exact, price_id, "priced", source))
    nums = [c_input, c_output, c_cache_read, c_cache_write, c_reasoning, c_input_audio, c_output_audio, c_request]
    if cost_usd is not None:
        # the client's amount is charged (EVENT_COST caps it); the computed one only splits it
        return _client_line(cost_usd, (nums, exact))
    total = round_half_even(exact, row.scale)
    if total > MAX_EVENT_COST_NANOS:
        return _over_cap_line(price_id, source)
    cost = dict(zip(COST_CLASSES, allocate(nums, row.scale, total)))
    return _new_line(PricedLine, (cost, total, price_id, "priced", source))


def _over_cap_line(price_id: str, source: str) -> PricedLine:
    return PricedLine(_zero_cost(), 0, price_id, COST_OVER_CAP, source)


def _client_line(cost_usd: Any, priced: tuple[list[int], int] | None) -> PricedLine:
    if isinstance(cost_usd, float):
        raise PricingError("cost_usd must be a decimal string, not a float")
    try:
        total = EVENT_COST.nanos(cost_usd)
    except MoneyError as exc:
        raise PricingError(f"cost_usd {exc.message}: {str(cost_usd)[:64]!r}") from None
    if priced is not None and priced[1] > 0:
        nums, exact = priced
        cost = dict(zip(COST_CLASSES, allocate([n * total for n in nums], exact, total)))
    else:
        cost = _zero_cost()
        cost["request"] = total
    return PricedLine(cost, total, "client", "client", "client")


def _as_instant(at: datetime | str | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    if isinstance(at, str):
        return utc_instant(at)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def effective_price(
    catalog: Catalog,
    overrides: TenantOverrides | None,
    provider: str,
    model: str,
    at: datetime | str | None = None,
) -> dict[str, Any]:
    """The price an event of (provider, model) at ``at`` (default now) gets, as decimal strings.

    ``per_mtok`` gives the effective USD per million tokens of every token class (after the
    fallbacks described in catalog.py), ``tiers`` the rates once ``input_tokens`` exceeds a start.
    """
    instant = _as_instant(at)
    resolution = catalog.resolve(provider, model)
    described: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "at": instant.isoformat().replace("+00:00", "Z"),
        "currency": "USD",
        "catalog": catalog.source,
        "resolved": None,
    }
    if resolution.model is not None:
        described["resolved"] = {
            "provider_id": resolution.provider_id,
            "price_list": resolution.model.provider_id,
            "model_id": resolution.model.model_id,
            "name": resolution.model.name,
        }
    if overrides and (hit := overrides.active(resolution, epoch_micros(instant))) is not None:
        return {
            **described,
            "price_source": "override",
            **hit.row.describe(),
            "valid_from": hit.effective_from.isoformat(),
            "valid_to": hit.effective_to.isoformat() if hit.effective_to else None,
        }
    if resolution.model is None:
        return {**described, "price_source": "none", "pricing_status": "unknown_model", "price_id": None}
    schedule = resolution.model.schedule
    date_str = instant.date().isoformat()
    row = schedule.row_at(date_str, instant)
    return {
        **described,
        "price_source": "catalog",
        **row.describe(),
        "valid_from": schedule.start_dates[schedule.rows.index(row)],
        "next_change": schedule.next_change_after(date_str),
    }


def list_prices(catalog: Catalog) -> list[dict[str, Any]]:
    """Every catalog model with all its price versions (decimal strings per million tokens)."""
    return [
        {
            "provider_id": model.provider_id,
            "model_id": model.model_id,
            "name": model.name,
            "prices": [
                {**row.describe(), "start_date": start}
                for row, start in zip(model.schedule.rows, model.schedule.start_dates)
            ],
        }
        for model in catalog.models()
    ]
