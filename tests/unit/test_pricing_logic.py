"""price() contract: breakdown semantics, client prices, unknown models, errors, API views."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices.data import providers
from genai_prices.data_snapshot import get_snapshot
from test_pricing_corpus import genai_price  # pytest puts tests/unit on sys.path

from spendstream.contracts import COST_CLASSES, PRICE_SOURCES, PRICING_STATUSES, usd_to_nanos
from spendstream.pricing import PricingError, default_catalog, effective_price, list_prices, price

TS = "2026-02-03T04:05:06.789Z"


def claude(**fields):
    return {"provider": "anthropic", "model": "claude-3-5-sonnet-20241022", "timestamp": TS, **fields}


def test_each_class_is_what_its_tokens_cost():
    # claude-3-5-sonnet: $3 input, $15 output, $0.30 cache read, $3.75 cache write, $6 1 h cache write per MTok
    line = price(
        claude(
            input_tokens=10_000,
            cache_read_tokens=4_000,
            cache_write_tokens=3_000,
            cache_write_1h_tokens=1_000,
            output_tokens=2_000,
            reasoning_tokens=500,
        ),
        default_catalog(),
    )
    assert line.cost == {
        "input": 3_000 * 3_000,  # 10k - 4k - 3k plain input tokens at 3000 nano-USD each
        "cache_read": 4_000 * 300,
        "cache_write": 2_000 * 3_750 + 1_000 * 6_000,
        "output": 1_500 * 15_000,
        "reasoning": 500 * 15_000,  # no reasoning price: the output price, booked as reasoning
        "input_audio": 0,
        "output_audio": 0,
        "request": 0,
    }
    assert line.cost_nanos == sum(line.cost.values()) == 53_700_000
    assert line.price_id == "anthropic/claude-3-5-sonnet@base"
    assert line.event_fields() == {
        "cost": line.cost,
        "cost_nanos": 53_700_000,
        "price_id": "anthropic/claude-3-5-sonnet@base",
        "pricing_status": "priced",
        "price_source": "catalog",
    }


def test_per_request_price_is_booked_under_request():
    event = {"provider": "perplexity", "model": "sonar", "timestamp": TS, "input_tokens": 100, "output_tokens": 10}
    line = price(event, default_catalog())
    assert line.cost["request"] == 12_000_000  # $12 per thousand requests
    assert line.cost_nanos == usd_to_nanos(genai_price(event, "perplexity", "sonar").total_price)


def test_off_peak_windows_switch_at_their_edges():
    catalog = default_catalog()
    seen = set()
    for clock in ("00:29:59.999", "00:30:00.000", "16:29:59.999", "16:30:00.000"):
        event = {"provider": "deepseek", "model": "deepseek-chat", "timestamp": f"2026-02-03T{clock}Z"}
        event.update(input_tokens=10**6, output_tokens=10**6)
        line = price(event, catalog)
        assert line.cost_nanos == usd_to_nanos(genai_price(event, "deepseek", "deepseek-chat").total_price), clock
        seen.add(line.price_id)
    assert seen == {"deepseek/deepseek-chat@base", "deepseek/deepseek-chat@00:30-16:30"}


def test_client_price_is_kept_and_split_like_the_catalog_would():
    line = price(claude(input_tokens=10_000, output_tokens=10_000, cost_usd="0.000000007"), default_catalog())
    assert (line.cost_nanos, line.pricing_status, line.price_source, line.price_id) == (7, "client", "client", "client")
    # catalog would charge input:output 3:15, so 7 nanos split 1.17:5.83 -> 1 and 6
    assert line.cost["input"] == 1 and line.cost["output"] == 6 and sum(line.cost.values()) == 7
    unknown = price({"provider": "acme", "model": "x", "timestamp": TS, "cost_usd": "1.25"}, default_catalog())
    assert unknown.cost == {**dict.fromkeys(COST_CLASSES, 0), "request": 1_250_000_000}
    assert unknown.pricing_status == "client"


def test_unknown_models_never_raise_and_cost_zero():
    line = price({"provider": "acme", "model": "house-7", "timestamp": TS, "input_tokens": 5}, default_catalog())
    assert (line.cost_nanos, line.pricing_status, line.price_source, line.price_id) == (0, "unknown_model", "none", "")
    assert line.pricing_status in PRICING_STATUSES and line.price_source in PRICE_SOURCES


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"model": "gpt-4o", "timestamp": TS}, "provider is required"),
        ({"provider": "openai", "timestamp": TS}, "model is required"),
        ({"provider": None, "model": "gpt-4o", "timestamp": TS}, "wrong type"),
        (claude(input_tokens=-1), "fit their parents"),
        (claude(input_tokens=10, cache_read_tokens=6, cache_write_tokens=6), "fit their parents"),
        (claude(input_tokens=10, cache_write_tokens=2, cache_write_1h_tokens=3), "fit their parents"),
        (claude(output_tokens=10, reasoning_tokens=8, output_audio_tokens=3), "fit their parents"),
        (claude(input_tokens=1.5), "integers"),
        (claude(input_tokens=Decimal(2)), "integers"),
        (claude(input_tokens="12"), "wrong type"),
        (claude(input_tokens=1, cost_usd=0.5), "not a float"),
        (claude(input_tokens=1, cost_usd="abc"), "not a decimal"),
        (claude(input_tokens=1, cost_usd="-1"), ">= 0"),
        (claude(input_tokens=1, cost_usd="NaN"), ">= 0"),
        ({"provider": "openai", "model": "o3", "timestamp": "yesterday", "input_tokens": 1}, "RFC 3339"),
    ],
)
def test_events_breaking_the_contract_raise_pricing_error(event, reason):
    with pytest.raises(PricingError, match=reason):
        price(event, default_catalog())


def test_effective_price_follows_price_changes_like_genai_prices():
    catalog = default_catalog()
    for at in ("2025-06-09T12:00:00Z", "2025-06-10T00:00:00Z"):
        view = effective_price(catalog, None, "openai", "o3", at)
        _, model = get_snapshot().find_provider_model("o3", None, "openai", None)
        row = model.get_prices(datetime.fromisoformat(at))
        assert view["price_source"] == "catalog"
        assert Decimal(view["per_mtok"]["input"]) == row.input_mtok
        assert Decimal(view["per_mtok"]["output"]) == row.output_mtok
        assert Decimal(view["per_mtok"]["cache_read"]) == row.cache_read_mtok
    before = effective_price(catalog, None, "openai", "o3", "2025-06-09T12:00:00Z")
    assert before["next_change"] == "2025-06-10"
    assert effective_price(catalog, None, "openai", "o3", "2025-06-10T00:00:00Z")["valid_from"] == "2025-06-10"


def test_effective_price_shows_tiers_and_unknown_models():
    view = effective_price(default_catalog(), None, "google", "gemini-2.5-pro", datetime(2026, 1, 1, tzinfo=UTC))
    assert view["tiers"] and view["tiers"][0]["input_tokens_above"] == 200_000
    assert Decimal(view["tiers"][0]["per_mtok"]["input"]) > Decimal(view["per_mtok"]["input"])
    unknown = effective_price(default_catalog(), None, "acme", "house-7", "2026-01-01T00:00:00Z")
    assert (unknown["price_source"], unknown["pricing_status"], unknown["resolved"]) == ("none", "unknown_model", None)


def test_list_prices_covers_every_catalog_model_and_price_version():
    listed = list_prices(default_catalog())
    assert len(listed) == sum(len(p.models) for p in providers)
    o3 = next(m for m in listed if (m["provider_id"], m["model_id"]) == ("openai", "o3"))
    assert [p["start_date"] for p in o3["prices"]] == [None, "2025-06-10"]
    assert all(isinstance(v, str) for p in o3["prices"] for v in p["per_mtok"].values())
