"""The one money parser (spendstream/money.py) and the caps: refusals, exactness, range edges, and
that a hostile input is refused without building it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.contracts import usd_to_nanos
from spendstream.money import (
    BUDGET_LIMIT,
    ESTIMATED_COST,
    EVENT_COST,
    INT64_MAX,
    MAX_BUDGET_LIMIT_NANOS,
    MAX_EVENT_COST_NANOS,
    MAX_MONEY_CHARS,
    MAX_OVERRIDE_EVENT_NANOS,
    MAX_PRICE_PER_MTOK_NANOS,
    MAX_PRICE_PER_REQUEST_NANOS,
    MAX_TOKENS_PER_EVENT,
    PRICE_PER_MTOK,
    PRICE_PER_REQUEST,
    MoneyError,
    MoneyRule,
    format_usd,
)
from spendstream.pricing import OverrideBook, default_catalog, price

RULES = (EVENT_COST, ESTIMATED_COST, BUDGET_LIMIT, PRICE_PER_MTOK, PRICE_PER_REQUEST)


def refusal(rule: MoneyRule, value: object) -> MoneyError:
    with pytest.raises(MoneyError) as caught:
        rule.nanos(value)
    assert caught.value.field == rule.field
    return caught.value


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        ("0", 0),
        ("0.0100", 10_000_000),
        (" 1.5 ", 1_500_000_000),
        ("1.", 1_000_000_000),
        (".5", 500_000_000),
        ("+2", 2_000_000_000),
        ("1E+2", 100_000_000_000),
        ("12.5e-1", 1_250_000_000),
        ("0.000000001", 1),
        ("1.0000000000000", 1_000_000_000),  # zeros past the 9th place lose nothing
        ("0e999999999", 0),
        (3, 3_000_000_000),
        (0.1, 100_000_000),  # the shortest repr, not the binary fraction 0.1000000000000000055...
        (3.3e-05, 33_000),
        (1e-09, 1),
        (Decimal("7.250000000000"), 7_250_000_000),  # as ClickHouse Decimal(38, 12) returns it
    ],
)
def test_decimal_notation_is_exact(value, nanos):
    assert EVENT_COST.nanos(value) == nanos


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1e999999999", "<= 1000000"),
        ("1e999999", "<= 1000000"),
        ("-1e999999999", ">= 0"),
        ("1e-999999999", "9 decimal places"),
        ("0.0000000001", "9 decimal places"),
        ("1.0000000001", "9 decimal places"),
        (0.30000000000000004, "9 decimal places"),  # float noise is refused, not rounded
        ("-1", ">= 0"),
        (-0.5, ">= 0"),
        ("-0.000000001", ">= 0"),
        ("NaN", "finite"),
        ("-Infinity", "finite"),
        ("sNaN", "finite"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Decimal("NaN"), "finite"),
        ("abc", "not a decimal"),
        ("", "not a decimal"),
        (".", "not a decimal"),
        ("1e", "not a decimal"),
        ("1_000", "not a decimal"),  # Decimal() would take it
        ("\u0661\u0662", "not a decimal"),  # Arabic-Indic digits: Decimal() would take them too
        ("0x10", "not a decimal"),
        (True, "decimal string"),
        (None, "decimal string"),
        ([1], "decimal string"),
        ({"usd": 1}, "decimal string"),
    ],
)
def test_refusals_name_the_field_and_say_why(value, fragment):
    assert fragment in str(refusal(EVENT_COST, value))


def test_a_megabyte_of_digits_is_refused_by_its_length():
    error = refusal(EVENT_COST, "1" * 1_000_000)
    assert str(error) == f"at most {MAX_MONEY_CHARS} characters"
    # leading zeros do not sneak a long string through either
    assert "characters" in str(refusal(EVENT_COST, "0" * 100 + "1"))


def test_huge_numbers_are_refused_before_they_are_built():
    # 10**999999999 would take ~400 MB and minutes to build; a refusal that returns at all proves
    # the exponent was compared, not applied
    assert "<= 1000000" in str(refusal(EVENT_COST, "9" * 50 + "e999999999"))
    assert "<= 1000000" in str(refusal(EVENT_COST, Decimal("1e999999999")))
    assert "9 decimal places" in str(refusal(EVENT_COST, Decimal("1e-999999999")))
    assert "<= 1000000" in str(refusal(EVENT_COST, 10**4000))  # a JSON integer literal of 4,001 digits
    assert "digits" in str(refusal(EVENT_COST, Decimal("1" * 100)))


@pytest.mark.parametrize(
    ("rule", "low", "high"),
    [
        (EVENT_COST, 0, MAX_EVENT_COST_NANOS),
        (ESTIMATED_COST, 0, MAX_EVENT_COST_NANOS),
        (BUDGET_LIMIT, 1, MAX_BUDGET_LIMIT_NANOS),
        (PRICE_PER_MTOK, 0, MAX_PRICE_PER_MTOK_NANOS),
        (PRICE_PER_REQUEST, 0, MAX_PRICE_PER_REQUEST_NANOS),
    ],
)
def test_range_edges_are_inclusive(rule, low, high):
    assert rule.nanos(format_usd(low)) == low
    assert rule.nanos(format_usd(high)) == high
    assert rule.nanos(Decimal(high).scaleb(-9)) == high
    if low > 0:
        assert "> 0" in str(refusal(rule, format_usd(low - 1)))
    else:
        assert ">= 0" in str(refusal(rule, "-0.000000001"))
    assert f"<= {format_usd(high)}" in str(refusal(rule, format_usd(high + 1)))


def test_budget_limit_must_be_positive():
    assert str(refusal(BUDGET_LIMIT, "0")) == "must be > 0 and <= 1000000000"
    assert BUDGET_LIMIT.nanos("0.000000001") == 1


def test_override_prices_take_no_float():
    assert "never float" in str(refusal(PRICE_PER_MTOK, 1.5))
    assert PRICE_PER_MTOK.usd("1.5") == Decimal("1.5")
    assert PRICE_PER_MTOK.nanos(2) == 2_000_000_000


def test_a_field_can_be_named_by_the_caller():
    with pytest.raises(MoneyError) as caught:
        PRICE_PER_MTOK.nanos("-1", "input_mtok")
    assert caught.value.field == "input_mtok"


@pytest.mark.parametrize(
    ("nanos", "text"),
    [(0, "0"), (1, "0.000000001"), (10_000_000, "0.01"), (3_000_000_000, "3"), (-1_500_000_000, "-1.5")],
)
def test_format_usd_is_plain_and_parses_back(nanos, text):
    assert format_usd(nanos) == text
    assert usd_to_nanos(text) == nanos


@given(st.integers(min_value=0, max_value=MAX_EVENT_COST_NANOS))
def test_every_amount_in_range_round_trips(nanos):
    usd = Decimal(nanos).scaleb(-9)
    for spelling in (format_usd(nanos), str(usd), f"{usd:E}", format(usd, "f")):
        assert EVENT_COST.nanos(spelling) == nanos, spelling


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_floats_are_read_by_their_shortest_repr(value):
    exact = Decimal(repr(value)) * 10**9
    if exact == exact.to_integral_value():
        assert EVENT_COST.nanos(value) == int(exact)
    else:
        assert "9 decimal places" in str(refusal(EVENT_COST, value))


@given(st.text(max_size=MAX_MONEY_CHARS + 8))
def test_any_text_is_an_amount_or_a_money_error(text):
    for rule in RULES:
        try:
            nanos = rule.nanos(text)
        except MoneyError as exc:
            assert exc.field == rule.field and str(exc)
        else:
            assert rule.min_nanos <= nanos <= rule.max_nanos


# ---------------------------------------------------------------- usd_to_nanos (computed amounts)


def test_usd_to_nanos_rounds_computed_amounts_half_to_even():
    assert usd_to_nanos(Decimal("0.0000000005")) == 0
    assert usd_to_nanos(Decimal("0.0000000015")) == 2
    assert usd_to_nanos("12.3456789125") == 12_345_678_912
    assert usd_to_nanos(Decimal("-0.0000000025")) == -2
    assert usd_to_nanos("1e-999999999") == 0
    with pytest.raises(ValueError):
        usd_to_nanos("1e999999999")
    with pytest.raises(ValueError):
        usd_to_nanos(Decimal(INT64_MAX + 1).scaleb(-9))


@given(st.decimals(min_value=-(10**9), max_value=10**9, allow_nan=False, places=15))
def test_usd_to_nanos_equals_decimal_rounding(amount):
    expected = int((amount * 10**9).to_integral_value(rounding=ROUND_HALF_EVEN))
    assert usd_to_nanos(amount) == usd_to_nanos(str(amount)) == expected


# ---------------------------------------------------------------- the caps hold for real prices


def test_the_priciest_override_times_the_most_tokens_fits_the_event_cap():
    top = format_usd(MAX_PRICE_PER_MTOK_NANOS)
    book = OverrideBook.from_rows([{
        "id": "top", "tenant": "t", "provider": "acme", "model": "m",
        "effective_from": datetime(2020, 1, 1, tzinfo=UTC), "effective_to": None,
        **{f"{atom}_mtok": top for atom in ("input", "output")},
        "per_request_usd": format_usd(MAX_PRICE_PER_REQUEST_NANOS),
    }])  # fmt: skip
    assert book.rejected == ()
    event = {"provider": "acme", "model": "m", "timestamp": "2025-01-01T00:00:00Z",
             "input_tokens": MAX_TOKENS_PER_EVENT, "output_tokens": MAX_TOKENS_PER_EVENT,
             "cache_read_tokens": MAX_TOKENS_PER_EVENT // 2, "reasoning_tokens": MAX_TOKENS_PER_EVENT}  # fmt: skip
    line = price(event, default_catalog(), book.for_tenant("t"))
    assert line.cost_nanos == MAX_OVERRIDE_EVENT_NANOS == 810_000 * 10**9
    assert line.cost_nanos <= MAX_EVENT_COST_NANOS < INT64_MAX


def test_the_dearest_catalog_model_at_the_token_cap_fits_the_event_cap():
    event = {"provider": "openai", "model": "o1-pro", "timestamp": "2025-06-01T00:00:00Z",
             "input_tokens": MAX_TOKENS_PER_EVENT, "output_tokens": MAX_TOKENS_PER_EVENT}  # fmt: skip
    line = price(event, default_catalog())
    assert line.pricing_status == "priced"
    assert 0 < line.cost_nanos <= MAX_EVENT_COST_NANOS
