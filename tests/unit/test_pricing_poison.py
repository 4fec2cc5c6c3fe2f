"""Poison in the pricing stage's core: the per-event cost cap (flagged, never crashed on), token
counts and client prices beyond their caps (dead-lettered), and a priced record that cannot be
encoded or is too large (the raw record dead-lettered, its ids not remembered). Every time the
next record is priced as usual."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

import stream_processors.pricing.logic as stage_logic
from spendstream.contracts import PRICING_STATUSES, raw_envelope, record_key
from spendstream.money import MAX_EVENT_COST_NANOS, MAX_TOKENS_PER_EVENT
from spendstream.pricing import (
    OverrideBook,
    PriceOverride,
    PricingError,
    default_catalog,
    price,
)
from stream_processors.pricing.logic import PricingStage, RawRecord

RAW = "spendstream.usage.raw"
NOW = 1_750_000_000_000
TS = "2025-03-01T12:00:00.000Z"
#: USD per million input tokens, 250 times money.MAX_PRICE_PER_MTOK_NANOS: no validated price
#: reaches the cap (money.py checks that at import), so the cap guards against a price row the
#: rules do not cover, such as a catalog entry or an override built without them (below)
HUGE_PRICE = Decimal(1_000_000)


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


@pytest.fixture(scope="module")
def overrides(catalog):
    row = {"id": "ovr-huge", "tenant": "t1", "provider": "openai", "model": "gpt-4o",
           "effective_from": datetime(2025, 1, 1, tzinfo=UTC), "input_mtok": HUGE_PRICE,
           "output_mtok": Decimal("10.0000005")}  # fmt: skip
    assert OverrideBook.from_rows([row], catalog).rejected  # a price_overrides row this dear is refused
    unchecked = PriceOverride(row["id"], row["tenant"], row["provider"], row["model"], row["effective_from"], None,
                              {"input": HUGE_PRICE, "output": Decimal("10.0000005")})  # fmt: skip
    assert unchecked.row.scale > 1  # a fraction of a nano-USD per output token: the rounding path
    return OverrideBook.from_overrides([unchecked], catalog)


def event(event_id: str, **fields) -> dict:
    return {"event_id": event_id, "timestamp": TS, "provider": "openai", "model": "gpt-4o", "input_tokens": 1_000,
            "output_tokens": 100, **fields}  # fmt: skip


def record(offset: int, events: list[dict]) -> RawRecord:
    return RawRecord(0, offset, record_key("t1", "p1"), orjson.dumps(raw_envelope("t1", "p1", TS, events)))


def priced_events(output) -> list[dict]:
    return orjson.loads(output.value)["events"]


def test_a_computed_cost_above_the_cap_is_flagged_at_cost_zero(catalog, overrides):
    tenant = overrides.for_tenant("t1")
    # 1,000,000 input tokens at 1,000,000 USD per million: exactly the cap, still priced
    at_cap = price(event("a", input_tokens=10**6, output_tokens=0), catalog, tenant)
    assert (at_cap.cost_nanos, at_cap.pricing_status) == (MAX_EVENT_COST_NANOS, "priced")
    assert at_cap.price_source == "override"
    over = price(event("b", input_tokens=10**6 + 1, output_tokens=0), catalog, tenant)
    assert (over.cost_nanos, over.pricing_status) == (0, "cost_over_cap")
    assert set(over.cost.values()) == {0}
    # the price that produced it stays visible, so it can be fixed and the event re-priced
    assert (over.price_id, over.price_source) == (at_cap.price_id, "override")
    assert over.pricing_status in PRICING_STATUSES
    # with a fractional rate the cap applies to the rounded total, the same way
    assert price(event("c", input_tokens=10**6, output_tokens=0), catalog, tenant).cost_nanos == MAX_EVENT_COST_NANOS
    scaled = price(event("c", input_tokens=10**6, output_tokens=1), catalog, tenant)
    assert (scaled.pricing_status, scaled.cost_nanos) == ("cost_over_cap", 0)
    # a client price is the amount charged; the computed one only splits it
    client = price(event("d", input_tokens=10**6 + 1, output_tokens=0, cost_usd="2.5"), catalog, tenant)
    assert (client.cost_nanos, client.pricing_status) == (2_500_000_000, "client")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"input_tokens": MAX_TOKENS_PER_EVENT + 1}, f"<= {MAX_TOKENS_PER_EVENT}"),
        ({"output_tokens": 2**64 - 1}, f"<= {MAX_TOKENS_PER_EVENT}"),
        ({"cost_usd": "1000000.000000001"}, "cost_usd must be"),
        ({"cost_usd": "1e30"}, "cost_usd must be"),
    ],
)
def test_counts_and_client_prices_beyond_their_caps_break_the_contract(catalog, fields, reason):
    with pytest.raises(PricingError, match=reason):
        price(event("x", **fields), catalog)


def test_the_stage_flags_dead_letters_and_prices_the_next_record(catalog, overrides):
    stage = PricingStage(catalog, RAW, 48 * 3_600_000)
    stage.overrides = overrides
    over_cap = event("over", input_tokens=5 * 10**6)
    too_many = event("many", input_tokens=2**63)
    result = stage.process([record(1, [over_cap, too_many, event("fine-1")]), record(2, [event("fine-2")])], NOW)
    first, second = (priced_events(o) for o in result.priced)
    assert [(e["event_id"], e["pricing_status"], e["cost_nanos"]) for e in first] == [
        ("over", "cost_over_cap", 0),
        ("fine-1", "priced", first[1]["cost_nanos"]),
    ]
    assert first[1]["cost_nanos"] > 0 and second[0]["pricing_status"] == "priced"
    (dlq,) = [orjson.loads(o.value) for o in result.dlq]
    assert dlq["src"] == {"topic": RAW, "partition": 0, "offset": 1}
    assert [(e["event"]["event_id"], e["reason"]) for e in dlq["events"]] == [
        ("many", f"token counts must be <= {MAX_TOKENS_PER_EVENT} per field")
    ]
    assert (result.cost_over_cap, result.rejected_events, dict(result.poison)) == (1, 1, {"invalid_events": 1})


def test_a_priced_record_that_cannot_be_encoded_is_dead_lettered_and_its_ids_stay_new(catalog, monkeypatch):
    def overflowing(ev, *args):
        line = price(ev, *args)
        return line._replace(cost_nanos=2**64) if ev["event_id"] == "boom" else line

    stage = PricingStage(catalog, RAW, 48 * 3_600_000)
    poisoned = record(7, [event("boom"), event("with-it")])
    monkeypatch.setattr(stage_logic, "price", overflowing)
    result = stage.process([poisoned, record(8, [event("after")])], NOW)
    assert [[e["event_id"] for e in priced_events(o)] for o in result.priced] == [["after"]]
    (dlq,) = [orjson.loads(o.value) for o in result.dlq]
    assert dlq["reason"].startswith("the priced record cannot be encoded")
    assert base64.b64decode(dlq["value_b64"]) == poisoned.value
    assert result.poison == {"unencodable": 1} and result.events_priced == 1
    # nothing of the dead-lettered record was remembered: a retry of its events is priced
    monkeypatch.setattr(stage_logic, "price", price)
    retry = stage.process([record(9, [event("with-it")])], NOW)
    assert [e["event_id"] for e in priced_events(retry.priced[0])] == ["with-it"]


def test_an_event_pricing_fails_on_unexpectedly_is_dead_lettered_alone(catalog, monkeypatch):
    def failing(ev, *args):
        if ev["event_id"] == "odd":
            raise ZeroDivisionError("division by zero")
        return price(ev, *args)

    monkeypatch.setattr(stage_logic, "price", failing)
    result = PricingStage(catalog, RAW, 48 * 3_600_000).process([record(3, [event("odd"), event("ok")])], NOW)
    assert [e["event_id"] for e in priced_events(result.priced[0])] == ["ok"]
    (dlq,) = [orjson.loads(o.value) for o in result.dlq]
    assert dlq["events"][0]["reason"] == "pricing failed: ZeroDivisionError: division by zero"


def test_a_priced_record_over_the_size_limit_is_dead_lettered(catalog):
    big = [event(f"e{i}", tags={"note": "x" * 200}) for i in range(50)]
    stage = PricingStage(catalog, RAW, 48 * 3_600_000, max_record_bytes=8_000)
    result = stage.process([record(4, big), record(5, [event("small")])], NOW)
    assert [[e["event_id"] for e in priced_events(o)] for o in result.priced] == [["small"]]
    (dlq,) = [orjson.loads(o.value) for o in result.dlq]
    assert "more than the 8000 allowed" in dlq["reason"] and dlq["src"]["offset"] == 4
    assert result.poison == {"too_large": 1}
    assert stage.index.first_seen("t1/p1", "e0") is None and stage.index.first_seen("t1/p1", "small") == (0, 5)
