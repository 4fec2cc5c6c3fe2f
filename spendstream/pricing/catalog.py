"""The price catalog: genai-prices' bundled data snapshot compiled once into integer rate tables.

Pure: reads only the installed ``genai-prices`` package (no network). Build it once per process
with :func:`load_catalog` (about half a second) and share it.

How a genai-prices ``ModelPrice`` becomes a :class:`PriceRow`
------------------------------------------------------------
genai-prices prices usage by *leaf decomposition*: every priced unit (``input_mtok``,
``cache_read_mtok``, ...) pays for its usage minus the usage of the more specific priced units
inside it. Contract v1 reports eight token counts whose disjoint parts we call *atoms*
(:data:`ATOMS`): ``input`` (input tokens in no finer class), ``cache_read``, ``cache_write``
(cache writes other than the 1 h part), ``cache_write_1h``, ``input_audio``, ``output``,
``reasoning``, ``output_audio``. Each atom has the dimensions of the usage key it is reported
under (:data:`ATOM_USAGE_KEYS`), so a unit counts an atom iff the unit's dimensions are a subset
of the atom's. Cost is linear in the counts for a fixed tier, so running genai-prices' leaf
algorithm on one atom at a time yields that atom's rate, e.g. ``cache_read`` tokens of a model
without a cache-read price pay the input price, and reasoning tokens pay the output price unless
``output_reasoning_mtok`` is set. Rates are stored as integers in ``1/scale`` nano-USD per token.

Contract v1 has no cached-audio count, so audio and cache atoms are disjoint: the usage handed to
genai-prices for comparison sets ``cache_audio_read_tokens=0`` (``genai_usage`` in
tests/fixtures/make_pricing_corpus.py).

Tiers: genai-prices applies a tier to *all* tokens of a priced unit once the request's total
``input_tokens`` is strictly above the tier's start. The distinct starts of a row split input
sizes into bands; each band has its own rate vector.

Price changes: a model's ``ConditionalPrice`` list is tried last to first, the first active
constraint wins, else the first entry. The start dates split time into intervals, each with a
fixed answer or a short list of time-of-day windows (DeepSeek off-peak) to test in order.

Not priced: usage contract v1 does not report (seconds of audio, images, web searches, ...), and
genai-prices' request-context ``price_variants`` (service tiers): events carry no tier, and
calc_price without a ``price_context`` ignores them as well.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal, localcontext
from functools import lru_cache
from importlib.metadata import version as package_version
from typing import Any

from genai_prices import types as gp
from genai_prices.data_units import unit_data
from genai_prices.units import UnitDef, UnitRegistry
from genai_prices.validation import validate_priced_units

from spendstream.pricing.normalize import (
    Predicate,
    compile_match,
    dash_compact_dates,
    micros_of_day,
    model_ref_candidates,
    provider_alias_key,
    utc_instant,
)

#: Disjoint token classes of contract v1, in the order of every rate vector.
ATOMS: tuple[str, ...] = (
    "input",
    "cache_read",
    "cache_write",
    "cache_write_1h",
    "input_audio",
    "output",
    "reasoning",
    "output_audio",
)
#: The genai-prices usage key each atom is reported under (its dimensions are the atom's).
ATOM_USAGE_KEYS: tuple[str, ...] = (
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_tokens",
    "output_reasoning_tokens",
    "output_audio_tokens",
)
REQUESTS_KEY = "requests"
NANOS_PER_MTOK_USD = 1000  # 1 USD per million tokens = 1000 nano-USD per token
NANOS_PER_KREQ_USD = 1_000_000  # 1 USD per thousand requests = 1e6 nano-USD per request

_REGISTRY = UnitRegistry(unit_data)
_ATOM_UNITS: tuple[UnitDef, ...] = tuple(_REGISTRY.units[k] for k in ATOM_USAGE_KEYS)
#: which atoms each reported usage key contains (keys contract v1 does not report count 0)
_ATOMS_IN_USAGE_KEY: dict[str, tuple[int, ...]] = {
    key: tuple(
        i for i, atom in enumerate(_ATOM_UNITS) if _REGISTRY.units[key].dimensions.items() <= atom.dimensions.items()
    )
    for key in ATOM_USAGE_KEYS
}
_EXACT = 80  # digits: every compile-time Decimal operation below is exact at this precision


def decimal_str(value: Decimal) -> str:
    """Plain decimal notation without exponent or trailing zeros ('0.3', '15', '0.0000125')."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One price version compiled for integer arithmetic.

    ``bands[b]`` holds the nine scaled integer rates (the :data:`ATOMS` then the per-request
    rate) for requests whose ``input_tokens`` exceeds ``thresholds[b-1]`` but not ``thresholds[b]``.
    An event's exact cost is ``sum(count * rate) / scale`` nano-USD.
    """

    price_id: str
    scale: int
    thresholds: tuple[int, ...]
    bands: tuple[tuple[int, ...], ...]
    per_mtok: tuple[tuple[Decimal, ...], ...]  # per band, USD per million tokens of each atom
    per_request: Decimal  # USD per request (not per thousand)

    @classmethod
    def from_rates(
        cls,
        price_id: str,
        thresholds: Sequence[int],
        per_mtok: Sequence[Sequence[Decimal]],
        per_request: Decimal,
    ) -> PriceRow:
        with localcontext(prec=_EXACT):
            nanos = [[rate * NANOS_PER_MTOK_USD for rate in band] + [per_request * 1_000_000_000] for band in per_mtok]
            digits = max((-v.normalize().as_tuple().exponent for band in nanos for v in band if v), default=0)
            scale = 10 ** max(0, digits)
            bands = tuple(tuple(int(v * scale) for v in band) for band in nanos)
        return cls(price_id, scale, tuple(thresholds), bands, tuple(tuple(b) for b in per_mtok), per_request)

    def describe(self) -> dict[str, Any]:
        """Decimal-string view for APIs: effective USD per million tokens of every class."""

        def rates(band: tuple[Decimal, ...]) -> dict[str, str]:
            return {atom: decimal_str(rate) for atom, rate in zip(ATOMS, band)}

        return {
            "price_id": self.price_id,
            "per_mtok": rates(self.per_mtok[0]),
            "per_request": decimal_str(self.per_request),
            "tiers": [
                {"input_tokens_above": start, "per_mtok": rates(band)}
                for start, band in zip(self.thresholds, self.per_mtok[1:])
            ],
        }


def _price_at(value: Decimal | gp.TieredPrices, input_tokens: int) -> Decimal:
    if isinstance(value, gp.TieredPrices):
        for tier in reversed(value.tiers):
            if input_tokens > tier.start:
                return tier.price
        return value.base
    return value


def compile_model_price(price_id: str, model_price: gp.ModelPrice) -> PriceRow:
    """Rates of one genai-prices ``ModelPrice`` (see the module docstring for the method)."""
    priced = [
        (_REGISTRY.unit_for_price_key(key), value)
        for key, value in model_price.__dict__.items()
        if value is not None and not key.startswith("_")
    ]
    # rows genai-prices would refuse to price (missing ancestor or join prices) and shapes this
    # compiler does not handle fail the build loudly, so a genai-prices upgrade cannot misprice
    validate_priced_units([unit for unit, _ in priced], _REGISTRY)
    token_units = [(u, v) for u, v in priced if u.usage_key != REQUESTS_KEY]
    request_price = next((v for u, v in priced if u.usage_key == REQUESTS_KEY), None)
    if isinstance(request_price, gp.TieredPrices):
        raise ValueError(f"{price_id}: tiered per-request prices are not supported")
    thresholds = sorted({t.start for _, v in priced if isinstance(v, gp.TieredPrices) for t in v.tiers})

    # leaf decomposition, most specific unit first, on usage vectors over the atoms
    order = sorted(token_units, key=lambda uv: (-len(uv[0].dimensions), uv[0].usage_key))
    leaves: dict[str, list[int]] = {}
    for unit, _ in order:
        leaf = [0] * len(ATOMS)
        for atom in _ATOMS_IN_USAGE_KEY.get(unit.usage_key, ()):
            leaf[atom] = 1
        for other, _ in order:
            if other is not unit and unit.dimensions.items() <= other.dimensions.items():
                leaf = [a - b for a, b in zip(leaf, leaves[other.usage_key])]
        leaves[unit.usage_key] = leaf

    per_mtok: list[tuple[Decimal, ...]] = []
    with localcontext(prec=_EXACT):
        for band in range(len(thresholds) + 1):
            representative = 0 if band == 0 else thresholds[band - 1] + 1
            rates = [Decimal(0)] * len(ATOMS)
            for unit, value in token_units:
                unit_rate = _price_at(value, representative) * 1_000_000 / unit.per
                for atom, weight in enumerate(leaves[unit.usage_key]):
                    if weight:
                        rates[atom] += unit_rate * weight
            per_mtok.append(tuple(rates))
        per_request = Decimal(0) if request_price is None else request_price / 1000
    return PriceRow.from_rates(price_id, thresholds, per_mtok, per_request)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    start_us: int  # UTC microseconds of day
    end_us: int
    row: PriceRow

    def contains(self, us_of_day: int) -> bool:
        if self.end_us < self.start_us:  # wraps midnight
            return us_of_day >= self.start_us or us_of_day < self.end_us
        return self.start_us <= us_of_day < self.end_us


@dataclass(frozen=True, slots=True)
class PriceSchedule:
    """Which row applies when: ``date_bounds`` split UTC dates into intervals; interval ``i``
    (dates ``>= date_bounds[i-1]`` and ``< date_bounds[i]``) tests ``windows[i]`` in order, then
    falls back to ``defaults[i]``. ``fixed`` short-cuts models with a single unconditional row."""

    rows: tuple[PriceRow, ...]
    start_dates: tuple[str | None, ...]  # per row, its start date (None when not date-bound)
    date_bounds: tuple[str, ...]
    windows: tuple[tuple[TimeWindow, ...], ...]
    defaults: tuple[PriceRow, ...]
    fixed: PriceRow | None

    def row_at(self, date_str: str, timestamp: str | datetime) -> PriceRow:
        i = bisect_right(self.date_bounds, date_str)
        windows = self.windows[i]
        if windows:
            instant = timestamp if isinstance(timestamp, datetime) else utc_instant(timestamp)
            us = micros_of_day(instant.astimezone(UTC))
            for window in windows:
                if window.contains(us):
                    return window.row
        return self.defaults[i]

    def next_change_after(self, date_str: str) -> str | None:
        i = bisect_right(self.date_bounds, date_str)
        return self.date_bounds[i] if i < len(self.date_bounds) else None


def _utc_micros_of_day(value: time) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return micros_of_day(datetime.combine(date(1970, 1, 2), aware).astimezone(UTC))


def _constraint_label(constraint: Any) -> str:
    if constraint is None:
        return "base"
    if isinstance(constraint, gp.StartDateConstraint):
        return constraint.start_date.isoformat()
    return f"{constraint.start_time.strftime('%H:%M')}-{constraint.end_time.strftime('%H:%M')}"


def compile_schedule(price_id_prefix: str, prices: gp.ModelPrice | list[gp.ConditionalPrice]) -> PriceSchedule:
    if isinstance(prices, gp.ModelPrice):
        row = compile_model_price(f"{price_id_prefix}@base", prices)
        return PriceSchedule((row,), (None,), (), ((),), (row,), row)

    labels = [_constraint_label(c.constraint) for c in prices]
    rows = tuple(
        compile_model_price(f"{price_id_prefix}@{label}" + (f"#{i}" if labels.count(label) > 1 else ""), c.prices)
        for i, (label, c) in enumerate(zip(labels, prices))
    )
    starts = [c.constraint.start_date if isinstance(c.constraint, gp.StartDateConstraint) else None for c in prices]
    bounds = sorted({s for s in starts if s is not None})
    windows: list[tuple[TimeWindow, ...]] = []
    defaults: list[PriceRow] = []
    for i in range(len(bounds) + 1):
        day = date.min if i == 0 else bounds[i - 1]
        tests: list[TimeWindow] = []
        chosen = rows[0]
        for c, row in zip(reversed(prices), reversed(rows)):
            constraint = c.constraint
            if isinstance(constraint, gp.TimeOfDateConstraint):
                tests.append(
                    TimeWindow(_utc_micros_of_day(constraint.start_time), _utc_micros_of_day(constraint.end_time), row)
                )
            elif constraint is None or constraint.start_date <= day:
                chosen = row
                break
        windows.append(tuple(tests))
        defaults.append(chosen)
    fixed = defaults[0] if not bounds and not windows[0] else None
    return PriceSchedule(
        rows,
        tuple(s.isoformat() if s else None for s in starts),
        tuple(b.isoformat() for b in bounds),
        tuple(windows),
        tuple(defaults),
        fixed,
    )


@dataclass(frozen=True, slots=True)
class CatalogModel:
    provider_id: str  # the provider whose price list holds the model
    model_id: str
    name: str | None
    schedule: PriceSchedule


@dataclass(frozen=True, slots=True)
class Resolution:
    """What an event's (provider, model) names resolve to; memoised per raw pair."""

    model: CatalogModel | None  # None: not in the catalog (an override may still price it)
    provider_id: str | None  # the catalog provider the event's provider resolved to
    raw_key: tuple[str, str]  # lower-cased names as sent, for overrides of custom models
    canonical_key: tuple[str, str] | None  # (provider_id, model id) for overrides of catalog models


@dataclass(slots=True)
class _Provider:
    id: str
    alias_key: str
    provider_match: Predicate | None
    model_match: Predicate | None
    models: tuple[tuple[Predicate, CatalogModel], ...]
    fallback_ids: tuple[str, ...]


@dataclass
class Catalog:
    """Compiled genai-prices snapshot plus a memo of resolved (provider, model) names."""

    version: str
    providers: tuple[_Provider, ...]
    memo_limit: int = 100_000
    _by_id: dict[str, _Provider] = field(init=False, repr=False)
    _memo: dict[tuple[str, str], Resolution] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.providers}

    @property
    def source(self) -> str:
        return f"genai-prices {self.version}"

    def models(self) -> Iterator[CatalogModel]:
        for provider in self.providers:
            for _, model in provider.models:
                yield model

    def resolve(self, provider: str, model: str) -> Resolution:
        key = (provider, model)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= self.memo_limit:
                self._memo.clear()  # bounded: client-chosen names must not grow memory forever
            found = self._memo[key] = self._resolve(provider, model)
        return found

    # --- layer 1: genai-prices' own lookup (DataSnapshot.find_provider_model) -----------------

    def _provider_by_id(self, provider_id: str) -> _Provider | None:
        wanted = provider_id.lower().strip()
        if (exact := self._by_id.get(wanted)) is not None:
            return exact
        return next((p for p in self.providers if p.provider_match is not None and p.provider_match(wanted)), None)

    def _match_model(self, provider: _Provider, ref: str, *, fallback: bool = True) -> CatalogModel | None:
        for predicate, model in provider.models:
            if predicate(ref):
                return model
        if fallback:
            for fallback_id in provider.fallback_ids:
                other = self._by_id.get(fallback_id)
                if other is not None and (model := self._match_model(other, ref, fallback=False)) is not None:
                    return model
        return None

    def _find_model(self, provider: _Provider, ref: str) -> CatalogModel | None:
        if (model := self._match_model(provider, ref)) is not None:
            return model
        dashed = dash_compact_dates(ref)
        return self._match_model(provider, dashed) if dashed != ref else None

    def _provider_for_model(self, ref: str) -> _Provider | None:
        return next((p for p in self.providers if p.model_match is not None and p.model_match(ref)), None)

    # --- layer 2: names genai-prices does not know (see normalize.py) ---------------------------

    def _provider_by_alias(self, name: str) -> _Provider | None:
        key = provider_alias_key(name)
        return next((p for p in self.providers if p.alias_key == key), None)

    def _resolve(self, provider_name: str, model_name: str) -> Resolution:
        ref = model_name.lower()  # genai-prices does not strip model names, only provider ids
        provider_id = provider_name.lower().strip()
        raw_key = (provider_id, ref.strip())
        if provider_id == "litellm" and "/" in ref:
            prefix, rest = ref.split("/", 1)
            if prefix and self._provider_by_id(prefix) is not None:
                provider_id, ref = prefix, rest
        provider = self._provider_by_id(provider_id)
        if provider is None and provider_id == "litellm":
            provider = self._provider_for_model(ref)
        model = self._find_model(provider, ref) if provider is not None else None

        if model is None:
            attempts = model_ref_candidates(ref)
            if provider is None:
                # a provider genai-prices does not know: first the name as sent, with the provider
                # found by alias or else by genai-prices' model-only decision
                provider = self._provider_by_alias(provider_id)
                attempts.insert(0, (None, ref))
            for hint, candidate in attempts:
                target = provider
                if target is None and hint is not None:
                    target = self._provider_by_id(hint) or self._provider_by_alias(hint)
                if target is None:
                    target = self._provider_for_model(candidate)
                if target is not None and (model := self._find_model(target, candidate)) is not None:
                    provider = target
                    break

        if model is None or provider is None:
            return Resolution(None, provider.id if provider else None, raw_key, None)
        return Resolution(model, provider.id, raw_key, (provider.id, model.model_id.lower()))


def _compile_provider(provider: gp.Provider) -> _Provider:
    models = tuple(
        (
            compile_match(m.match),
            CatalogModel(provider.id, m.id, m.name, compile_schedule(f"{provider.id}/{m.id}", m.prices)),
        )
        for m in provider.models
    )
    return _Provider(
        id=provider.id,
        alias_key=provider_alias_key(provider.id),
        provider_match=compile_match(provider.provider_match) if provider.provider_match else None,
        model_match=compile_match(provider.model_match) if provider.model_match else None,
        models=models,
        fallback_ids=tuple(provider.fallback_model_providers or ()),
    )


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The process-wide catalog of the installed genai-prices snapshot (compiled on first use)."""
    return load_catalog()


def load_catalog(providers: list[gp.Provider] | None = None) -> Catalog:
    """Compile the bundled genai-prices snapshot (or the given provider list, for tests)."""
    if providers is None:
        from genai_prices.data import providers as bundled

        providers = bundled
    return Catalog(package_version("genai-prices"), tuple(_compile_provider(p) for p in providers))
