"""Money inputs and override replacement against the embedded ClickHouse (and broker, for the
gateway's budget check): every bad amount is a 4xx naming its field; ``PUT`` of an override id
replaces that override whatever it changes and ``DELETE`` removes it from pricing and listings."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from gateway_support import gateway  # tests/integration is on sys.path
from query_api_stack import admin_and_reader, migrate

from spendstream.clickhouse import get_client
from spendstream.money import MAX_BUDGET_LIMIT_NANOS, MAX_EVENT_COST_NANOS, format_usd
from spendstream.pricing import OverrideBook
from stream_processors.pricing.agents import OverrideRows

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "m" * 24
TENANT = "tenant_money"
BUDGET = {"name": "money", "scope": {"project": "p"}, "window": "daily", "limit_usd": "10.00"}
OVERRIDE = {"provider": "acme", "model": "house-1", "effective_from": "2024-01-01T00:00:00Z",
            "per_mtok": {"input": "1.25", "output": "5"}}  # fmt: skip
#: each was accepted, answered 500, or held the event loop for seconds before the money parser
HOSTILE_AMOUNTS = ["1e999999", "1e999999999999", "-1e999999", "1" * 50_000, "0.0000000001", "NaN", "-1"]


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (_, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader}


def assert_names(response, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json()["field"] == field, response.text[:300]


# ---------------------------------------------------------------- budgets API


@pytest.mark.parametrize(
    "limit", [*HOSTILE_AMOUNTS, "0", "1.0000000001", 10**30, format_usd(MAX_BUDGET_LIMIT_NANOS + 1)]
)
def test_budget_limits_out_of_bounds_are_422_naming_limit_usd(api, limit):
    admin = api["admin"]
    assert_names(admin.post("/v1/budgets", json={**BUDGET, "limit_usd": limit}), "limit_usd")


def test_budget_limit_edges_and_updates(api):
    admin = api["admin"]
    created = admin.post("/v1/budgets", json={**BUDGET, "limit_usd": format_usd(MAX_BUDGET_LIMIT_NANOS)})
    assert created.status_code == 201, created.text
    budget = created.json()
    assert budget["limit_usd"] == "1000000000.000000000"
    assert_names(admin.put(f"/v1/budgets/{budget['id']}", json={**BUDGET, "limit_usd": "1e999999999999"}), "limit_usd")
    assert api["reader"].get(f"/v1/budgets/{budget['id']}").json()["limit_usd"] == "1000000000.000000000"


@pytest.mark.parametrize("name", ["ops\r\nBcc: everyone@example.com", "two\nlines", "bell\x07", "sep\u2028x"])
def test_budget_names_with_control_characters_are_422_naming_name(api, name):
    admin = api["admin"]
    assert_names(admin.post("/v1/budgets", json={**BUDGET, "name": name}), "name")
    created = admin.post("/v1/budgets", json=BUDGET).json()
    assert_names(admin.put(f"/v1/budgets/{created['id']}", json={**BUDGET, "name": name}), "name")
    assert api["reader"].get(f"/v1/budgets/{created['id']}").json()["name"] == "money"


# ---------------------------------------------------------------- override prices


@pytest.mark.parametrize(
    ("amount", "above_request_cap"), [(a, a) for a in HOSTILE_AMOUNTS] + [("4000.000000001", "10000.000000001")]
)
def test_override_prices_out_of_bounds_are_422_naming_the_price(api, amount, above_request_cap):
    admin = api["admin"]
    assert_names(admin.put("/v1/pricing/overrides", json={**OVERRIDE, "per_mtok": {"output": amount}}), "output_mtok")
    answer = admin.put("/v1/pricing/overrides", json={**OVERRIDE, "per_request_usd": above_request_cap})
    assert_names(answer, "per_request_usd")


def test_override_prices_must_be_strings(api):
    answer = api["admin"].put("/v1/pricing/overrides", json={**OVERRIDE, "per_mtok": {"input": 1.25}})
    assert_names(answer, "per_mtok.input")


def stage_rows(settings) -> list[dict]:
    """What the pricing stage loads, through its own reader."""
    reader = OverrideRows(settings)
    try:
        return [r for r in reader.read() if r["tenant"] == TENANT]
    finally:
        reader._client.close()  # it keeps its client between reloads; a test reads once


def price_source(reader, provider: str, model: str) -> str:
    return reader.get(f"/v1/pricing/{provider}/{model}", params={"at": "2025-01-01"}).json()["price_source"]


def test_put_with_an_id_replaces_the_override_whatever_it_changes(api):
    admin, reader, settings = api["admin"], api["reader"], api["settings"]
    first = admin.put("/v1/pricing/overrides", json=OVERRIDE)
    assert first.status_code == 200, first.text
    ident = first.json()["id"]
    changes = [
        {"model": "house-2"},  # another sorting key of price_overrides
        {"model": "house-2", "provider": "acme-cloud", "effective_from": "2023-06-01T00:00:00Z"},
        {
            "model": "house-2",
            "provider": "acme-cloud",
            "per_mtok": {"input": "2"},
            "effective_to": "2026-01-01T00:00:00Z",
        },  # fmt: skip
    ]
    for change in changes:
        body = {**OVERRIDE, **change, "id": ident}
        put = admin.put("/v1/pricing/overrides", json=body)
        assert put.status_code == 200, put.text
        listed = [o for o in reader.get("/v1/pricing/overrides").json()["overrides"] if o["id"] == ident]
        assert [(o["provider"], o["model"], o["per_mtok_given"]) for o in listed] == [
            (body["provider"], body["model"], body["per_mtok"])
        ]
        rows = [r for r in stage_rows(settings) if r["id"] == ident]
        assert [(r["provider"], r["model"]) for r in rows] == [(body["provider"], body["model"])]
    assert price_source(reader, "acme", "house-1") == "none"
    assert price_source(reader, "acme", "house-2") == "none"
    now = reader.get("/v1/pricing/acme-cloud/house-2", params={"at": "2025-01-01"}).json()
    assert now["price_source"] == "override" and now["per_mtok"]["input"] == "2" and now["per_mtok"]["output"] == "0"
    assert OverrideBook.from_rows(stage_rows(settings)).rejected == ()


def test_delete_removes_the_override_from_pricing_and_listings(api):
    admin, reader, settings = api["admin"], api["reader"], api["settings"]
    ident = admin.put("/v1/pricing/overrides", json={**OVERRIDE, "model": "house-9"}).json()["id"]
    # moved once, so the id has had two sorting keys
    assert admin.put("/v1/pricing/overrides", json={**OVERRIDE, "model": "house-10", "id": ident}).status_code == 200
    assert price_source(reader, "acme", "house-10") == "override"
    assert admin.delete(f"/v1/pricing/overrides/{ident}").status_code == 204
    assert ident not in [o["id"] for o in reader.get("/v1/pricing/overrides").json()["overrides"]]
    assert ident not in [o["id"] for o in reader.get("/v1/pricing").json()["overrides"]]
    assert ident not in [r["id"] for r in stage_rows(settings)]
    assert price_source(reader, "acme", "house-9") == price_source(reader, "acme", "house-10") == "none"
    assert admin.delete(f"/v1/pricing/overrides/{ident}").status_code == 404
    # the id can be used again, and then it is one override once more
    again = admin.put("/v1/pricing/overrides", json={**OVERRIDE, "model": "house-11", "id": ident})
    assert again.status_code == 200
    assert [r["model"] for r in stage_rows(settings) if r["id"] == ident] == ["house-11"]


def test_a_stored_override_beyond_todays_caps_is_listed_as_rejected_not_a_500(api):
    client = get_client(api["settings"])
    try:
        client.insert(
            "price_overrides",
            [[TENANT, "ovr-old", "acme", "legacy", datetime(2024, 1, 1, tzinfo=UTC), Decimal(5000), "", 0, 1]],
            column_names=[
                "tenant",
                "id",
                "provider",
                "model",
                "effective_from",
                "input_mtok",
                "note",
                "deleted",
                "version",
            ],
        )
    finally:
        client.close()
    listed = api["reader"].get("/v1/pricing/overrides")
    assert listed.status_code == 200
    [old] = [o for o in listed.json()["overrides"] if o["id"] == "ovr-old"]
    assert "input_mtok" in old["rejected"] and "<= 4000" in old["rejected"]
    assert price_source(api["reader"], "acme", "legacy") == "none"  # the pricing stage skips it as well


# ---------------------------------------------------------------- gateway budget check


@pytest.mark.kafka
async def test_budget_check_estimates_out_of_bounds_are_422_naming_the_field(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    async with gateway(settings, ADMIN_KEY) as client:
        deadline = time.monotonic() + 30
        while (ready := await client.post("/v1/budgets/check", json={})).status_code == 503:
            assert time.monotonic() < deadline, ready.text
            await asyncio.sleep(0.1)
        assert ready.status_code == 200, ready.text
        at_cap = await client.post("/v1/budgets/check", json={"estimated_cost_usd": format_usd(MAX_EVENT_COST_NANOS)})
        assert at_cap.status_code == 200 and at_cap.json()["estimated_cost_usd"] == "1000000.000000000"
        for estimate in [*HOSTILE_AMOUNTS, "1000000.000000001", 0.30000000000000004, 10**4000]:
            answer = await client.post("/v1/budgets/check", json={"estimated_cost_usd": estimate})
            assert_names(answer, "estimated_cost_usd")
        # JSON numbers Python's json would not even write
        for raw in (b"NaN", b"-Infinity", b"1e999999"):
            answer = await client.post(
                "/v1/budgets/check", content=b'{"estimated_cost_usd": ' + raw + b"}",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            assert_names(answer, "estimated_cost_usd")
        # an integer literal beyond what the JSON parser reads is a malformed body
        answer = await client.post("/v1/budgets/check", content=b'{"estimated_cost_usd": ' + b"9" * 10_000 + b"}")
        assert_names(answer, "body")
