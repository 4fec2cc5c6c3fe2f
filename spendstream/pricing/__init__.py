"""Exact pricing of usage events from the genai-prices catalog plus tenant overrides. Pure: no IO.

Start-up: ``catalog = default_catalog()``;
on override changes: ``book = OverrideBook.from_rows(rows, catalog)``;
per event: ``price(event, catalog, book.for_tenant(tenant))``.
"""

from spendstream.pricing.catalog import (
    ATOMS,
    Catalog,
    CatalogModel,
    PriceRow,
    Resolution,
    default_catalog,
    load_catalog,
)
from spendstream.pricing.logic import PricedLine, PricingError, effective_price, list_prices, price
from spendstream.pricing.overrides import OVERRIDE_COLUMNS, OverrideBook, PriceOverride, TenantOverrides

__all__ = [
    "ATOMS",
    "OVERRIDE_COLUMNS",
    "Catalog",
    "CatalogModel",
    "OverrideBook",
    "PriceOverride",
    "PriceRow",
    "PricedLine",
    "PricingError",
    "Resolution",
    "TenantOverrides",
    "default_catalog",
    "effective_price",
    "list_prices",
    "load_catalog",
    "price",
]
