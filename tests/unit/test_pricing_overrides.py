"""Tenant price overrides: effective period, precedence, fallbacks, validation."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from spendstream.pricing import OverrideBook, PriceOverride, default_catalog, effective_price, price

FROM = "2026-05-01T00:00:00.000Z"
TO = "2026-06-01T00:00:00.000Z"


def row(**changes):
    base = {
        "id": "ovr-1",
        "tenant": "acme",
        "provider": "anthropic",
        "model": "claude-3-5-sonnet",
        "effective_from": datetime(2026, 5, 1, tzinfo=UTC),
        "effective_to": datetime(2026, 6, 1, tzinfo=UTC),
        "input_mtok": Decimal("1.5"),
        "output_mtok": "7",
    }
    return {**base, **changes}


def event(timestamp: str, **tokens):
    counts = {"input_tokens": 1_000_000, "output_tokens": 100_000, **tokens}
    return {"provider": "anthropic", "model": "claude-3-5-sonnet-20241022", "timestamp": timestamp, **counts}


@pytest.fixture(scope="module")
def book():
    return OverrideBook.from_rows([row()], default_catalog())


@pytest.mark.parametrize(
    ("timestamp", "source"),
    [
        ("2026-04-30T23:59:59.999Z", "catalog"),
        (FROM, "override"),
        ("2026-05-17T12:00:00.000Z", "override"),
        ("2026-05-31T23:59:59.999Z", "override"),
        (TO, "catalog"),
        ("2026-07-01T00:00:00.000Z", "catalog"),
    ],
)
def test_override_wins_from_effective_from_until_effective_to(book, timestamp, source):
    catalog = default_catalog()
    line = price(event(timestamp), catalog, book.for_tenant("acme"))
    assert line.price_source == source
    if source == "override":
        # 1M input tokens at $1.5/MTok + 100k output tokens at $7/MTok = $1.5 + $0.7
        assert line.cost_nanos == 2_200_000_000
        assert line.cost["input"] == 1_500_000_000 and line.cost["output"] == 700_000_000
        assert line.price_id == "override:ovr-1"
    else:
        assert line.cost_nanos == price(event(timestamp), catalog).cost_nanos  # the catalog's own price
        assert line.price_id.startswith("anthropic/claude-3-5-sonnet@")


def test_other_tenants_keep_catalog_prices(book):
    catalog = default_catalog()
    line = price(event("2026-05-17T12:00:00.000Z"), catalog, book.for_tenant("someone-else"))
    assert line.price_source == "catalog"


def test_unpriced_classes_fall_back_to_their_parent_class(book):
    line = price(
        event("2026-05-17T12:00:00Z", cache_read_tokens=200_000, cache_write_tokens=100_000, reasoning_tokens=50_000),
        default_catalog(),
        book.for_tenant("acme"),
    )
    # cache read/write at the input price, reasoning at the output price
    assert line.cost == {
        "input": 1_050_000_000,
        "cache_read": 300_000_000,
        "cache_write": 150_000_000,
        "output": 350_000_000,
        "reasoning": 350_000_000,
        "input_audio": 0,
        "output_audio": 0,
        "request": 0,
    }


def test_latest_effective_from_wins_and_custom_models_get_priced():
    rows = [
        row(id="old", effective_to=None),
        row(id="newer", effective_from="2026-05-15T00:00:00Z", effective_to=None, input_mtok="2", output_mtok="2"),
        row(id="custom", provider="acme-llm", model="house-model-7", per_request_usd="0.01", input_mtok=None),
    ]
    book = OverrideBook.from_rows(rows, default_catalog())
    tenant = book.for_tenant("acme")
    assert price(event("2026-05-10T00:00:00.000Z"), default_catalog(), tenant).price_id == "override:old"
    assert price(event("2026-05-20T00:00:00.000Z"), default_catalog(), tenant).price_id == "override:newer"

    custom = {"provider": "ACME-LLM", "model": "House-Model-7", "timestamp": "2026-05-20T00:00:00.000Z"}
    custom.update(input_tokens=10, output_tokens=3)
    line = price(custom, default_catalog(), tenant)
    assert (line.pricing_status, line.price_source) == ("priced", "override")
    assert line.cost_nanos == 10_000_000 + 3 * 7_000  # $0.01 per request + 3 output tokens at $7/MTok
    assert price(custom, default_catalog()).pricing_status == "unknown_model"


def test_sub_nano_prices_round_half_even_and_keep_the_breakdown_summing():
    book = OverrideBook.from_rows([row(input_mtok="0.0005", output_mtok="0.0015", effective_to=None)])
    tenant = book.for_tenant("acme")
    # exact model name: the book was built without a catalog
    base = {"provider": "anthropic", "model": "claude-3-5-sonnet", "timestamp": FROM}
    # 1 input token = 0.5 nano, 1 output token = 1.5 nano: total 2 nano exactly
    line = price({**base, "input_tokens": 1, "output_tokens": 1}, default_catalog(), tenant)
    assert line.cost_nanos == 2 and sum(line.cost.values()) == 2
    # 1 input token alone: 0.5 nano rounds half to even -> 0; 3 input tokens: 1.5 -> 2
    assert price({**base, "input_tokens": 1, "output_tokens": 0}, default_catalog(), tenant).cost_nanos == 0
    assert price({**base, "input_tokens": 3, "output_tokens": 0}, default_catalog(), tenant).cost_nanos == 2


def test_effective_price_reports_the_override_then_the_catalog(book):
    tenant = book.for_tenant("acme")
    model = "claude-3-5-sonnet-20241022"
    during = effective_price(default_catalog(), tenant, "anthropic", model, "2026-05-02T00:00:00Z")
    assert during["price_source"] == "override"
    assert during["per_mtok"]["input"] == "1.5" and during["per_mtok"]["cache_read"] == "1.5"
    assert during["valid_to"] == "2026-06-01T00:00:00+00:00"
    assert PriceOverride.from_row(row()).describe()["per_mtok_given"] == {"input": "1.5", "output": "7"}
    after = effective_price(default_catalog(), tenant, "anthropic", model, datetime(2026, 6, 1, tzinfo=UTC))
    assert after["price_source"] == "catalog"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"input_mtok": 1.5}, "never float"),
        ({"output_mtok": "-1"}, ">= 0"),
        ({"output_mtok": "abc"}, "not a decimal"),
        ({"tenant": " "}, "blank"),
        ({"effective_from": "yesterday"}, "RFC 3339"),
        ({"effective_to": datetime(2026, 4, 1, tzinfo=UTC)}, "after effective_from"),
        ({"input_mtok": None, "output_mtok": None}, "at least one price"),
    ],
)
def test_bad_rows_are_rejected_without_dropping_good_ones(changes, reason):
    book = OverrideBook.from_rows([row(id="bad", **changes), row(id="good", tenant="other")])
    assert [ident for ident, _ in book.rejected] == ["bad"]
    assert reason in book.rejected[0][1]
    assert book.for_tenant("other")
    with pytest.raises(ValueError, match=reason):
        PriceOverride.from_row(row(id="bad", **changes))
