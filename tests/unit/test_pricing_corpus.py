"""The pricing corpus priced by spendstream equals genai-prices' own calc_price, to the nano-USD."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from genai_prices import calc_price
from genai_prices import types as gp

from spendstream.contracts import COST_CLASSES, usd_to_nanos
from spendstream.pricing import default_catalog, price

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPUS = FIXTURES / "pricing_corpus.ndjson"
INPUT_CLASSES = ("input", "cache_read", "cache_write", "input_audio")
OUTPUT_CLASSES = ("output", "reasoning", "output_audio")


def _load_corpus_script() -> Any:
    spec = importlib.util.spec_from_file_location("make_pricing_corpus", FIXTURES / "make_pricing_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus_script = _load_corpus_script()
genai_usage = corpus_script.genai_usage


def load_corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def genai_price(event: dict[str, Any], provider: str, model: str) -> gp.PriceCalculation:
    """genai-prices' own price of the event's usage at the event's time."""
    at = datetime.fromisoformat(event["timestamp"])
    return calc_price(genai_usage(event), model, provider_id=provider, genai_request_timestamp=at)


def reference(event: dict[str, Any]) -> gp.PriceCalculation:
    return genai_price(event, event["tags"]["corpus.ref_provider"], event["tags"]["corpus.ref_model"])


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, Any]]:
    return load_corpus()


def test_every_catalog_priced_event_equals_calc_price_to_the_nano(corpus):
    catalog = default_catalog()
    checked, mismatches = 0, []
    for event in corpus:
        if "corpus.ref_model" not in event["tags"]:
            continue
        line = price(event, catalog)
        calc = reference(event)
        expected = usd_to_nanos(calc.total_price)
        in_sum = sum(line.cost[c] for c in INPUT_CLASSES)
        out_sum = sum(line.cost[c] for c in OUTPUT_CLASSES)
        problems = []
        if (line.pricing_status, line.price_source) != ("priced", "catalog"):
            problems.append(f"status {line.pricing_status}/{line.price_source}")
        if line.cost_nanos != expected:
            problems.append(f"total {line.cost_nanos} != calc_price {expected} ({calc.total_price})")
        if sum(line.cost.values()) != line.cost_nanos or set(line.cost) != set(COST_CLASSES):
            problems.append(f"breakdown {line.cost} does not sum to {line.cost_nanos}")
        # per direction, only the documented rounding allocation (< 1 nano per class) may differ
        if abs(in_sum - calc.input_price * 10**9) >= len(INPUT_CLASSES):
            problems.append(f"input classes {in_sum} vs calc input_price {calc.input_price}")
        if abs(out_sum - calc.output_price * 10**9) >= len(OUTPUT_CLASSES):
            problems.append(f"output classes {out_sum} vs calc output_price {calc.output_price}")
        if problems:
            mismatches.append((event["event_id"], event["provider"], event["model"], problems))
        checked += 1
    assert not mismatches, mismatches[:10]
    assert checked >= 450


def test_client_priced_events_keep_their_cost(corpus):
    catalog = default_catalog()
    client = [e for e in corpus if e.get("cost_usd") is not None]
    assert len(client) >= 3
    for event in client:
        line = price(event, catalog)
        assert (line.pricing_status, line.price_source, line.price_id) == ("client", "client", "client")
        assert line.cost_nanos == usd_to_nanos(event["cost_usd"])
        assert sum(line.cost.values()) == line.cost_nanos


def test_unknown_models_are_kept_at_zero_with_status(corpus):
    catalog = default_catalog()
    unknown = [e for e in corpus if e["tags"]["corpus.case"] == "unknown"]
    assert len(unknown) >= 3
    for event in unknown:
        line = price(event, catalog)
        assert (line.pricing_status, line.price_source, line.cost_nanos) == ("unknown_model", "none", 0)
        assert set(line.cost.values()) == {0}


def test_corpus_covers_the_acceptance_matrix(corpus):
    assert len(corpus) >= 300
    priced = [e for e in corpus if "corpus.ref_model" in e["tags"]]
    calcs = [(e, reference(e)) for e in priced]
    assert len({calc.provider.id for _, calc in calcs}) >= 10
    assert len({e["provider"] for e in corpus}) >= 10
    for field in (
        "cache_read_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "reasoning_tokens",
        "input_audio_tokens",
        "output_audio_tokens",
    ):
        assert sum(1 for e in priced if e.get(field)) >= 10, field

    def priced_keys(calc: gp.PriceCalculation, key: str) -> bool:
        return getattr(calc.model_price, key, None) is not None

    # audio and 1 h cache writes that are priced as such, not only reported
    assert sum(1 for e, c in calcs if e.get("input_audio_tokens") and priced_keys(c, "input_audio_mtok")) >= 10
    assert sum(1 for e, c in calcs if e.get("cache_write_1h_tokens") and priced_keys(c, "cache_write_1h_mtok")) >= 3
    assert sum(1 for _, c in calcs if priced_keys(c, "requests_kcount")) >= 3

    # tier thresholds crossed: the same tiered model seen below and above a start
    sides: dict[tuple[str, str], set[bool]] = {}
    for event, calc in calcs:
        for value in calc.model_price.__dict__.values():
            if isinstance(value, gp.TieredPrices):
                start = value.tiers[0].start
                sides.setdefault((calc.provider.id, calc.model.id), set()).add(event.get("input_tokens", 0) > start)
    assert sum(1 for s in sides.values() if s == {True, False}) >= 10

    # price changes: one model priced with different genai-prices rows at different times
    rows: dict[tuple[str, str], set[str]] = {}
    for _, calc in calcs:
        if isinstance(calc.model.prices, list):
            rows.setdefault((calc.provider.id, calc.model.id), set()).add(repr(calc.model_price))
    assert sum(1 for r in rows.values() if len(r) >= 2) >= 10

    names = [e["model"] for e in corpus]
    assert any(n.startswith(("us.", "eu.")) and "anthropic." in n for n in names)  # Bedrock cross-region ids
    assert any(n.startswith("arn:aws:bedrock") for n in names)
    assert any(e["provider"] == "openrouter" and "/" in e["model"] for e in corpus)
    assert any(e["provider"] == "azure" for e in corpus)


def test_corpus_file_is_what_the_committed_script_generates(corpus):
    assert [json.loads(json.dumps(e, sort_keys=True)) for e in corpus_script.build()] == corpus
