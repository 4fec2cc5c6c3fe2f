"""Every money input and count reaches the one parser and its caps: the gateway's events (pure, and
through the app without a broker: refusals are answered before Kafka), budget limits and names,
override prices."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import orjson
import pytest

from ingest_gateway.app import create_app
from ingest_gateway.logic import RequestContext, validate_event
from ingest_gateway.usage import normalise_usage
from spendstream.budgets import check_budget_name, parse_limit_nanos
from spendstream.money import MAX_TOKENS_PER_EVENT, MoneyError
from spendstream.pricing import OverrideBook, PriceOverride
from spendstream.settings import Settings

CTX = RequestContext(int(datetime(2025, 6, 1, 12, tzinfo=UTC).timestamp() * 1e9))
EVENT = {"project": "bot", "provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 2}
HOSTILE_COSTS = ["1e999999", "1e999999999", "1" * 100_000, "0.0000000001", "-1", "NaN", "Infinity", "1000000.000000001"]


def first_error(event: dict) -> dict:
    normalised, errors = validate_event(event, CTX)
    assert normalised is None and errors
    return errors[0]


@pytest.mark.parametrize("cost", HOSTILE_COSTS)
def test_bad_client_costs_are_rejected_naming_cost_usd(cost):
    assert first_error({**EVENT, "cost_usd": cost})["field"] == "cost_usd"


def test_a_cost_at_the_cap_is_kept_in_one_spelling():
    normalised, errors = validate_event({**EVENT, "cost_usd": "1E+6"}, CTX)
    assert errors == [] and normalised["cost_usd"] == "1000000"


def test_token_fields_are_capped():
    normalised, errors = validate_event({**EVENT, "input_tokens": MAX_TOKENS_PER_EVENT}, CTX)
    assert errors == [] and normalised["input_tokens"] == MAX_TOKENS_PER_EVENT
    for field in ("input_tokens", "output_tokens"):
        assert first_error({**EVENT, field: MAX_TOKENS_PER_EVENT + 1})["field"] == field


def test_totals_a_usage_object_adds_up_are_capped_too():
    # Anthropic input_tokens excludes cache tokens: the contract's input_tokens is the sum of three
    counts, errors = normalise_usage({
        "input_tokens": MAX_TOKENS_PER_EVENT, "cache_read_input_tokens": MAX_TOKENS_PER_EVENT,
        "cache_creation_input_tokens": 1, "output_tokens": 1,
    })  # fmt: skip
    assert counts == {}
    assert errors == [{"field": "usage", "message": f"input_tokens adds up to {2 * MAX_TOKENS_PER_EVENT + 1}, "
                                                    f"more than {MAX_TOKENS_PER_EVENT}"}]  # fmt: skip
    gemini = {"usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": MAX_TOKENS_PER_EVENT,
                                "thoughtsTokenCount": 1}}  # fmt: skip
    gemini_event = {"project": "p", "model": "google/gemini-2.5-pro", "usage": gemini}
    assert first_error(gemini_event)["field"] == "usage.usageMetadata"


@pytest.mark.parametrize("limit", ["1e999999", "1e999999999999", "-1e999999", "1e-999999", "1" * 5000, 10**4000])
def test_hostile_budget_limits_are_value_errors(limit):
    # a ValueError is what the budgets API turns into a 422; an ArithmeticError was a 500
    with pytest.raises(MoneyError) as caught:
        parse_limit_nanos(limit)
    assert caught.value.field == "limit_usd"


@pytest.mark.parametrize(
    "name",
    ["ops\r\nBcc: everyone@example.com", "line\nbreak", "tab\there", "nul\x00", "del\x7f", "nel\x85", "ls\u2028"],
)
def test_budget_names_with_control_characters_are_refused(name):
    with pytest.raises(ValueError, match="control characters"):
        check_budget_name(name)


def test_budget_names_are_trimmed_and_may_be_any_printable_text():
    assert check_budget_name("  Équipe données 🚀 (prod)  ") == "Équipe données 🚀 (prod)"
    for bad in ("", "   ", "x" * 257):
        with pytest.raises(ValueError):
            check_budget_name(bad)


@pytest.mark.parametrize(
    ("column", "value", "fragment"),
    [
        ("input_mtok", "1e999999999", "<= 4000"),
        ("output_mtok", "3999.9999999999", "9 decimal places"),
        ("cache_read_mtok", "4000.1", "<= 4000"),
        ("per_request_usd", "10000.01", "<= 10000"),
        ("per_request_usd", "1e-999999999", "9 decimal places"),
    ],
)
def test_override_prices_are_bounded(column, value, fragment):
    row = {"id": "o1", "tenant": "t", "provider": "acme", "model": "m",
           "effective_from": datetime(2025, 1, 1, tzinfo=UTC), "input_mtok": "1", column: value}  # fmt: skip
    with pytest.raises(MoneyError) as caught:
        PriceOverride.from_row(row)
    assert caught.value.field == column and fragment in str(caught.value) and "override o1" in str(caught.value)
    assert OverrideBook.from_rows([row]).rejected == (("o1", str(caught.value)),)


# ---------------------------------------------------------------- through the gateway app


ADMIN = "test-admin-key-money-0123456789"
CLOSED = "127.0.0.1:1"  # nothing listens: every request here must be answered before any broker


@pytest.fixture(scope="module")
async def gateway():
    settings = Settings(
        bootstrap_admin_key=ADMIN,
        bootstrap_tenant="acme",
        kafka={"bootstrap_servers": CLOSED, "profile": "embedded"},
        clickhouse={"url": f"http://{CLOSED}"},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        ) as client:  # fmt: skip
            yield client


async def test_two_thousand_huge_exponent_costs_are_all_refused(gateway):
    batch = [{**EVENT, "event_id": f"e{i}", "cost_usd": "1e999999"} for i in range(2000)]
    answer = await gateway.post("/v1/events", content=orjson.dumps(batch))
    assert answer.status_code == 400
    body = answer.json()
    assert body["accepted"] == 0 and len(body["rejected"]) == 2000
    assert {e["field"] for r in body["rejected"] for e in r["errors"]} == {"cost_usd"}


@pytest.mark.parametrize(
    "raw_cost",
    [b'"1e999999"', b'"' + b"9" * 100_000 + b'"', b"1e999999", b"9" * 5000, b'"0.0000000001"', b'"NaN"', b"-1"],
)
async def test_each_bad_cost_is_a_400_naming_cost_usd(gateway, raw_cost):
    body = orjson.dumps(EVENT)[:-1] + b',"cost_usd":' + raw_cost + b"}"
    answer = await gateway.post("/v1/events", content=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["rejected"][0]["errors"][0]["field"] == "cost_usd"


async def test_token_counts_beyond_the_cap_are_a_400_naming_the_field(gateway):
    for field in ("input_tokens", "output_tokens"):
        answer = await gateway.post("/v1/events", content=orjson.dumps({**EVENT, field: MAX_TOKENS_PER_EVENT + 1}))
        assert answer.status_code == 400
        assert answer.json()["rejected"][0]["errors"][0]["field"] == field
