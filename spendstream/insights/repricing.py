"""History at today's prices, for forecasts. Pure.

A forecast projects spend at the prices that will apply, so days priced before a catalog price
change are re-priced: each (day, provider, model) row of summed tokens gets
``cost + (tokens at today's rates - tokens at that day's rates)``. The difference is computed
from the summed tokens with the rates' first band (a row of the daily aggregate no longer knows
which of its events crossed a tier threshold), rounded once, half to even; days whose price did
not change keep their exact cost. Models with time-of-day prices (off-peak windows) and models
outside the catalog are kept as charged, and so is usage a tenant override priced (the override
is the tenant's contract, not the catalog's); the answer lists every re-priced model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from spendstream.pricing.catalog import Catalog, PriceRow
from spendstream.pricing.logic import round_half_even


def atoms(tokens: Mapping[str, int]) -> tuple[int, ...]:
    """Summed token counts (contract v1 names) -> the disjoint classes of ``catalog.ATOMS``."""
    get = tokens.get
    input_tokens, output_tokens = int(get("input_tokens", 0)), int(get("output_tokens", 0))
    cache_read, cache_write = int(get("cache_read_tokens", 0)), int(get("cache_write_tokens", 0))
    cache_write_1h, input_audio = int(get("cache_write_1h_tokens", 0)), int(get("input_audio_tokens", 0))
    reasoning, output_audio = int(get("reasoning_tokens", 0)), int(get("output_audio_tokens", 0))
    return (
        input_tokens - cache_read - cache_write - input_audio,
        cache_read,
        cache_write - cache_write_1h,
        cache_write_1h,
        input_audio,
        output_tokens - reasoning - output_audio,
        reasoning,
        output_audio,
    )


def scaled_cost(row: PriceRow, tokens: Mapping[str, int], calls: int, band: int = 0) -> int:
    """Exact cost of summed usage at one band's rates, in ``1/row.scale`` nano-USD."""
    rates = row.bands[band]
    return sum(count * rate for count, rate in zip(atoms(tokens), rates)) + calls * rates[8]


def linear_cost(row: PriceRow, tokens: Mapping[str, int], calls: int, band: int = 0) -> int:
    """Cost of summed usage at one band's rates, nano-USD, rounded once half to even."""
    return round_half_even(scaled_cost(row, tokens, calls, band), row.scale)


@dataclass(frozen=True)
class Repriced:
    provider: str
    model: str
    from_price_ids: tuple[str, ...]
    to_price_id: str
    days: int
    #: what today's price adds to the history (negative: a price cut)
    delta_nanos: int


def _row_on(catalog: Catalog, provider: str, model: str, day: date) -> PriceRow | None:
    resolution = catalog.resolve(provider, model)
    if resolution.model is None:
        return None
    schedule = resolution.model.schedule
    if schedule.fixed is not None:
        return schedule.fixed
    if any(schedule.windows):  # time-of-day prices: a day's sum mixes rows
        return None
    return schedule.row_at(day.isoformat(), datetime.combine(day, time(12), tzinfo=UTC))


def price_changed_since(catalog: Catalog, provider: str, model: str, since: date, today: date) -> bool:
    """Whether the model's catalog price (date-bound, not time-of-day) changed after ``since``."""
    resolution = catalog.resolve(provider, model)
    if resolution.model is None or resolution.model.schedule.fixed is not None:
        return False
    schedule = resolution.model.schedule
    return not any(schedule.windows) and any(since.isoformat() < b <= today.isoformat() for b in schedule.date_bounds)


def reprice_history(
    rows: Iterable[dict[str, Any]],
    catalog: Catalog,
    today: date,
    *,
    overridden: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[list[dict[str, Any]], list[Repriced]]:
    """Rows (``day``: date, ``provider``, ``model``, ``calls``, ``cost_nanos``, token sums) with
    ``cost_nanos`` at today's catalog price, and what was re-priced. ``overridden``: lower-cased
    (provider, model) pairs a tenant override prices, kept as charged."""
    out: list[dict[str, Any]] = []
    changes: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        provider, model, day = row["provider"], row["model"], row["day"]
        key = (provider, model)
        then = None if (provider.lower(), model.lower()) in overridden else _row_on(catalog, provider, model, day)
        now = _row_on(catalog, provider, model, today) if then is not None else None
        if then is None or now is None or then.price_id == now.price_id:
            out.append(row)
            continue
        delta = linear_cost(now, row, int(row["calls"])) - linear_cost(then, row, int(row["calls"]))
        out.append({**row, "cost_nanos": max(0, int(row["cost_nanos"]) + delta)})
        change = changes.setdefault(key, {"from": set(), "to": now.price_id, "days": set(), "delta": 0})
        change["from"].add(then.price_id)
        change["days"].add(day)
        change["delta"] += delta
    repriced = [
        Repriced(p, m, tuple(sorted(c["from"])), c["to"], len(c["days"]), c["delta"])
        for (p, m), c in sorted(changes.items())
    ]
    return out, repriced
