"""Tenant price overrides: custom models and corrections with an effective period. Pure: no IO.

An override prices one (provider, model) for one tenant from ``effective_from`` (inclusive) until
``effective_to`` (exclusive, open when absent) and then wins over the catalog. Prices are USD per
million tokens for the classes in :data:`~spendstream.pricing.catalog.ATOMS`, plus an optional
USD price per request, each a decimal string (or Decimal) of at most 9 decimal places within
the caps of spendstream/money.py (``PRICE_PER_MTOK``, ``PRICE_PER_REQUEST``), so no event an
override prices can exceed the per-event cost cap. A class without a price pays its parent's
price, as in genai-prices: ``cache_read``, ``cache_write`` and ``input_audio`` fall back to
``input``; ``cache_write_1h`` to ``cache_write``; ``reasoning`` and ``output_audio`` to
``output``. ``input`` and ``output`` without a price cost 0, but an override must name at least
one price.

Storage is other code's job (the query API writes a ClickHouse table ``price_overrides`` whose
rows carry the columns in :data:`OVERRIDE_COLUMNS`); the pricing stage reloads the rows and calls
:meth:`OverrideBook.from_rows`, which is cheap enough to rebuild on every change.

Matching: an override's provider/model are compared lower-cased with the event's names as sent,
and, when a catalog is given to :meth:`OverrideBook.from_rows`, also with the catalog model they
resolve to, so an override of ``anthropic/claude-3-5-sonnet`` also covers
``claude-3-5-sonnet-20241022``. When several overrides cover an instant, the latest
``effective_from`` wins (a correction of a correction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from spendstream.money import PRICE_PER_MTOK, PRICE_PER_REQUEST, MoneyError, MoneyRule
from spendstream.pricing.catalog import ATOMS, Catalog, PriceRow, Resolution, decimal_str
from spendstream.pricing.normalize import epoch_micros, utc_instant

#: the column holding each class's USD-per-million-tokens price
PRICE_COLUMNS: dict[str, str] = {atom: f"{atom}_mtok" for atom in ATOMS}
OVERRIDE_COLUMNS: tuple[str, ...] = (
    "id",
    "tenant",
    "provider",
    "model",
    "effective_from",
    "effective_to",
    *PRICE_COLUMNS.values(),
    "per_request_usd",
)
#: class -> the class whose price it pays when it has none
PARENT_CLASS: dict[str, str] = {
    "cache_read": "input",
    "cache_write": "input",
    "cache_write_1h": "cache_write",
    "input_audio": "input",
    "reasoning": "output",
    "output_audio": "output",
}


def _price(rule: MoneyRule, value: Any, ident: str, column: str) -> Decimal:
    try:
        return rule.usd(value, column)
    except MoneyError as exc:
        # the book lists rejected rows by reason: say which override and column
        raise MoneyError(column, f"override {ident} {column}: {exc.message}") from None


def _instant(value: Any, what: str) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str):
        try:
            return utc_instant(value)
        except ValueError:
            pass
    raise ValueError(f"{what}: {value!r} is not an RFC 3339 time")


@dataclass(frozen=True)
class PriceOverride:
    id: str
    tenant: str
    provider: str
    model: str
    effective_from: datetime
    effective_to: datetime | None
    per_mtok: Mapping[str, Decimal]  # class -> USD per million tokens; classes absent use PARENT_CLASS
    per_request: Decimal | None = None  # USD per request
    row: PriceRow = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("id", "tenant", "provider", "model"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must not be blank")
        unknown = set(self.per_mtok) - set(ATOMS)
        if unknown:
            raise ValueError(f"unknown price classes {sorted(unknown)}; known: {list(ATOMS)}")
        if not self.per_mtok and self.per_request is None:
            raise ValueError("an override needs at least one price")
        if self.effective_to is not None and self.effective_to <= self.effective_from:
            raise ValueError("effective_to must be after effective_from")
        rates: dict[str, Decimal] = {}
        for atom in ATOMS:  # parents come before their children in ATOMS
            given = self.per_mtok.get(atom)
            parent = PARENT_CLASS.get(atom)
            rates[atom] = given if given is not None else rates[parent] if parent else Decimal(0)
        row = PriceRow.from_rates(
            f"override:{self.id}", (), [tuple(rates[a] for a in ATOMS)], self.per_request or Decimal(0)
        )
        object.__setattr__(self, "row", row)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PriceOverride:
        """One ``price_overrides`` row (see :data:`OVERRIDE_COLUMNS`; NULL prices may be absent)."""
        ident = str(row.get("id") or "")
        per_mtok = {
            atom: _price(PRICE_PER_MTOK, row[column], ident, column)
            for atom, column in PRICE_COLUMNS.items()
            if row.get(column) is not None
        }
        per_request = row.get("per_request_usd")
        if per_request is not None:
            per_request = _price(PRICE_PER_REQUEST, per_request, ident, "per_request_usd")
        effective_to = row.get("effective_to")
        return cls(
            id=ident,
            tenant=str(row.get("tenant") or ""),
            provider=str(row.get("provider") or ""),
            model=str(row.get("model") or ""),
            effective_from=_instant(row.get("effective_from"), f"override {ident} effective_from"),
            effective_to=None if effective_to is None else _instant(effective_to, f"override {ident} effective_to"),
            per_mtok=per_mtok,
            per_request=per_request,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "provider": self.provider,
            "model": self.model,
            "effective_from": self.effective_from.isoformat(),
            "effective_to": self.effective_to.isoformat() if self.effective_to else None,
            "per_mtok_given": {atom: decimal_str(v) for atom, v in self.per_mtok.items()},
            **self.row.describe(),
        }


@dataclass(frozen=True, slots=True)
class _Window:
    from_us: int
    to_us: int | None
    override: PriceOverride


class TenantOverrides:
    """One tenant's overrides by (provider, model) key, each list latest ``effective_from`` first."""

    __slots__ = ("_by_key",)

    def __init__(self, by_key: Mapping[tuple[str, str], tuple[_Window, ...]] | None = None) -> None:
        self._by_key = dict(by_key or {})

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def windows_for(self, resolution: Resolution) -> tuple[_Window, ...]:
        """Overrides that may apply to these names: exact names as sent first, then the catalog model."""
        exact = self._by_key.get(resolution.raw_key, ())
        if resolution.canonical_key is None or resolution.canonical_key == resolution.raw_key:
            return exact
        return exact + self._by_key.get(resolution.canonical_key, ())

    def active(self, resolution: Resolution, at_us: int) -> PriceOverride | None:
        return active_override(self.windows_for(resolution), at_us)


def active_override(windows: tuple[_Window, ...], at_us: int) -> PriceOverride | None:
    for window in windows:
        if window.from_us <= at_us and (window.to_us is None or at_us < window.to_us):
            return window.override
    return None


NO_OVERRIDES = TenantOverrides()


@dataclass(frozen=True)
class OverrideBook:
    """All tenants' overrides, built in one pass; ``rejected`` lists rows that failed validation."""

    tenants: Mapping[str, TenantOverrides]
    rejected: tuple[tuple[str, str], ...] = ()  # (override id, reason)

    def for_tenant(self, tenant: str) -> TenantOverrides:
        return self.tenants.get(tenant, NO_OVERRIDES)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], catalog: Catalog | None = None) -> OverrideBook:
        """Validate and index ``price_overrides`` rows; a bad row is rejected, never fatal."""
        overrides: list[PriceOverride] = []
        rejected: list[tuple[str, str]] = []
        for row in rows:
            try:
                overrides.append(PriceOverride.from_row(row))
            except (ValueError, KeyError, TypeError) as exc:
                rejected.append((str(row.get("id", "")), str(exc)))
        book = cls.from_overrides(overrides, catalog)
        return cls(book.tenants, tuple(rejected))

    @classmethod
    def from_overrides(cls, overrides: Iterable[PriceOverride], catalog: Catalog | None = None) -> OverrideBook:
        grouped: dict[str, dict[tuple[str, str], list[_Window]]] = {}
        for override in overrides:
            window = _Window(
                epoch_micros(override.effective_from),
                None if override.effective_to is None else epoch_micros(override.effective_to),
                override,
            )
            keys = {(override.provider.lower().strip(), override.model.lower().strip())}
            if catalog is not None:
                canonical = catalog.resolve(override.provider, override.model).canonical_key
                if canonical is not None:
                    keys.add(canonical)
            tenant = grouped.setdefault(override.tenant, {})
            for key in keys:
                tenant.setdefault(key, []).append(window)

        def latest_first(windows: list[_Window]) -> tuple[_Window, ...]:
            return tuple(sorted(windows, key=lambda w: (w.from_us, w.override.id), reverse=True))

        return cls(
            {
                tenant: TenantOverrides({key: latest_first(windows) for key, windows in by_key.items()})
                for tenant, by_key in grouped.items()
            }
        )
