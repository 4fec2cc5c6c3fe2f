"""Hostile input against the real stack: one tenant's requests never take a shared service down.

The stack runs as production runs it (`spendstream gateway`, `query-api`, `processors --stages
pricing|budgets|notify|sink` as child processes on a broker and a ClickHouse database of this
module's own). Tenant "mallory" sends each class of hostile input the hardening issue lists; every
request must be answered within a second with a 4xx whose JSON body names the offending field
(never a 5xx, never a hang). After each class, the normal tenant's canary runs: an event posted to
the gateway is priced, stored in ClickHouse (visible through the query API) and crosses a budget
whose alert reaches a real webhook receiver.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stage_support import migrate

from spendstream.devstack import Stack
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.keys import connect, create_key
from spendstream.money import MAX_EVENT_COST_NANOS, MAX_PRICE_PER_MTOK_NANOS, MAX_TOKENS_PER_EVENT
from spendstream.ports import free_port_run
from spendstream.topics import ensure_topics_sync
from stream_processors.stages import STAGES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from notify_support import Receiver, wait_until  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.clickhouse]

#: the issue's promise: a hostile request is answered (refused) within a second
ANSWER_WITHIN_S = 1.0
HUGE_EXPONENT = "1e999999"
COMPONENTS = ("gateway", "pricing", "budgets", "notify", "sink", "query-api")


class Services:
    def __init__(self, stack: Stack, admin_key: str, mallory_key: str):
        self.stack = stack
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.mallory = {"Authorization": f"Bearer {mallory_key}"}
        self.canaries = itertools.count()


@pytest.fixture(scope="module")
def services(make_settings, tmp_path_factory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("hostile")
    broker = EmbeddedKafka(log_path=tmp / "tansu.log").start()
    admin_key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap},
        bootstrap_admin_key=admin_key,
        processors={"web_port": free_port_run(len(STAGES))},
        notify={"webhook": {"allow_private": True}},
        budgets={"reload_s": 0.2},
    )
    migrate(settings)
    ensure_topics_sync(settings)
    _, mallory_key = create_key(connect(settings), "mallory", "ingest,read,admin", name="hostile tenant")
    stack = Stack(settings, tmp / "stack", components=COMPONENTS)
    try:
        stack.start(supervise=False)
        yield Services(stack, admin_key, mallory_key)
    finally:
        stack.stop()
        broker.stop()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
async def webhook_id(services: Services, receiver: Receiver) -> str:
    async with httpx.AsyncClient(base_url=services.stack.query_url, headers=services.admin, timeout=30) as api:
        created = await api.post("/v1/webhooks", json={"url": receiver.url("/canary")})
        assert created.status_code == 201, created.text
        return created.json()["id"]


async def refused(response_coro: Any, field: str, status: int | tuple[int, ...] = (400, 422)) -> httpx.Response:
    """Await one request: a 4xx (``status``) within a second whose JSON body names ``field``."""
    started = time.monotonic()
    response = await response_coro
    elapsed = time.monotonic() - started
    expected = (status,) if isinstance(status, int) else status
    assert response.status_code in expected, (response.status_code, response.text[:500])
    assert elapsed < ANSWER_WITHIN_S, f"answered after {elapsed:.2f} s"
    assert field in response.text, f"{field!r} not named in {response.text[:500]}"
    response.json()  # a JSON body, not a plain-text error page
    return response


async def normal_tenant_is_served(services: Services, receiver: Receiver, webhook_id: str) -> None:
    """The canary: priced, stored, and alerted on, for the tenant that did nothing wrong."""
    n = next(services.canaries)
    project = f"canary-{n}"
    async with (
        httpx.AsyncClient(base_url=services.stack.query_url, headers=services.admin, timeout=30) as api,
        httpx.AsyncClient(base_url=services.stack.gateway_url, headers=services.admin, timeout=30) as gateway,
    ):
        budget = await api.post("/v1/budgets", json={
            "name": f"canary {n}", "scope": {"project": project}, "window": "total", "limit_usd": "0.003",
            "thresholds": [100], "forecast": False, "channels": [webhook_id],
        })  # fmt: skip
        assert budget.status_code == 201, budget.text
        budget_id = budget.json()["id"]
        await asyncio.sleep(0.6)  # the budgets stage re-reads budgets every 0.2 s here
        sent = await gateway.post("/v1/events", json={
            "event_id": f"canary-{n}", "project": project, "provider": "openai", "model": "gpt-4o",
            "input_tokens": 1000, "output_tokens": 100,
        })  # fmt: skip
        assert sent.status_code == 202, sent.text

        async def stored() -> dict[str, Any]:
            r = await api.get("/v1/analytics/overview", params={"project": project, "from": "2020-01-01"})
            assert r.status_code == 200, r.text
            return r.json()

        deadline = time.monotonic() + 60
        overview = await stored()
        while overview["calls"] != 1:
            assert time.monotonic() < deadline, f"canary {n} never stored: {overview}"
            await asyncio.sleep(0.2)
            overview = await stored()
        # gpt-4o: 1000 input at $2.50/MTok + 100 output at $10/MTok, priced by the pricing stage
        assert overview["cost_nanos"] == 3_500_000, overview

    def alerted() -> bool:
        return any(r.json().get("budget_id") == budget_id for r in receiver.at("/canary"))

    await wait_until(alerted, f"canary {n}'s budget alert at the receiver", timeout=60, step=0.1)


# ---------------------------------------------------------------- money and counts (part 2)


async def test_huge_exponent_costs_are_refused_fast_naming_the_field(services, receiver, webhook_id):
    batch = [
        {"event_id": f"exp-{i}", "project": "p", "provider": "openai", "model": "gpt-4o",
         "input_tokens": 1, "output_tokens": 1, "cost_usd": HUGE_EXPONENT}
        for i in range(2000)
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=services.stack.gateway_url, headers=services.mallory, timeout=30) as gw:
        r = await refused(gw.post("/v1/events", json=batch), "cost_usd")
        assert r.json()["accepted"] == 0 if "accepted" in r.json() else True
        for cost in ("1" + "0" * 100_000, "0.0000000001", "-1", "NaN", "Infinity", "1e9999999999"):
            one = {**batch[0], "cost_usd": cost}
            await refused(gw.post("/v1/events", json=one), "cost_usd")
        await refused(gw.post("/v1/budgets/check", json={
            "scope": {"project": "p"}, "estimated_cost_usd": HUGE_EXPONENT}), "estimated_cost_usd")  # fmt: skip
    await normal_tenant_is_served(services, receiver, webhook_id)


async def test_token_counts_beyond_the_cap_are_refused(services, receiver, webhook_id):
    async with httpx.AsyncClient(base_url=services.stack.gateway_url, headers=services.mallory, timeout=30) as gw:
        for field in ("input_tokens", "output_tokens"):
            event = {"project": "p", "provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}
            await refused(gw.post("/v1/events", json={**event, field: 2**63}), field)
    await normal_tenant_is_served(services, receiver, webhook_id)


async def test_budget_and_override_money_is_bounded(services, receiver, webhook_id):
    async with httpx.AsyncClient(base_url=services.stack.query_url, headers=services.mallory, timeout=30) as api:
        budget = {"name": "b", "scope": {"project": "p"}, "window": "month", "limit_usd": HUGE_EXPONENT}
        await refused(api.post("/v1/budgets", json=budget), "limit_usd", (400, 422))
        await refused(api.post("/v1/budgets", json={**budget, "limit_usd": "1.0000000001"}), "limit_usd", (400, 422))
        override = {"provider": "openai", "model": "gpt-4o", "effective_from": "2024-01-01T00:00:00Z",
                    "per_mtok": {"input": HUGE_EXPONENT}}  # fmt: skip
        await refused(api.put("/v1/pricing/overrides", json=override), "input", (400, 422))
        await refused(api.put("/v1/pricing/overrides", json={**override, "per_mtok": {}, "per_request_usd": HUGE_EXPONENT}),
                      "per_request_usd", (400, 422))  # fmt: skip
    await normal_tenant_is_served(services, receiver, webhook_id)


async def test_an_override_times_the_largest_event_is_flagged_not_crashed_on(services, receiver, webhook_id):
    """The priciest override the API accepts times the most tokens the gateway accepts stays in range."""

    top_price = f"{MAX_PRICE_PER_MTOK_NANOS // 10**9}"
    async with (
        httpx.AsyncClient(base_url=services.stack.query_url, headers=services.mallory, timeout=30) as api,
        httpx.AsyncClient(base_url=services.stack.gateway_url, headers=services.mallory, timeout=30) as gw,
    ):
        put = await api.put("/v1/pricing/overrides", json={
            "provider": "openai", "model": "gpt-4o", "effective_from": "2024-01-01T00:00:00Z",
            "per_mtok": {"input": top_price, "output": top_price}})  # fmt: skip
        assert put.status_code in (200, 201), put.text
        await asyncio.sleep(2.5)  # the pricing stage re-reads overrides every 2 s
        sent = await gw.post("/v1/events", json={
            "event_id": "mallory-max", "project": "max", "provider": "openai", "model": "gpt-4o",
            "input_tokens": MAX_TOKENS_PER_EVENT, "output_tokens": MAX_TOKENS_PER_EVENT})  # fmt: skip
        assert sent.status_code == 202, sent.text
        expected_nanos = 2 * MAX_TOKENS_PER_EVENT * MAX_PRICE_PER_MTOK_NANOS // 1_000_000
        deadline = time.monotonic() + 60
        while True:
            overview = (await api.get("/v1/analytics/overview", params={"project": "max", "from": "2020-01-01"})).json()
            if overview["calls"] == 1:
                break
            assert time.monotonic() < deadline, f"the largest event was never stored: {overview}"
            await asyncio.sleep(0.2)
        # stored exactly, under the per-event cap: no wrap, no crash, no flag needed
        assert overview["cost_nanos"] == expected_nanos <= MAX_EVENT_COST_NANOS, overview
    await normal_tenant_is_served(services, receiver, webhook_id)


# ---------------------------------------------------------------- notify (part 4)


async def test_header_injection_and_recipient_lists_are_refused(services, receiver, webhook_id):
    async with httpx.AsyncClient(base_url=services.stack.query_url, headers=services.mallory, timeout=30) as api:
        for address in ("a@example.com, b@example.com", "a@example.com\r\nBcc: c@example.com", "not an address"):
            await refused(api.post("/v1/webhooks", json={"email": address}), "email", (400, 422))
        await refused(api.post("/v1/budgets", json={
            "name": "evil\r\nBcc: c@example.com", "scope": {"project": "p"}, "window": "month", "limit_usd": "1"}),
            "name", (400, 422))  # fmt: skip
    await normal_tenant_is_served(services, receiver, webhook_id)


# ---------------------------------------------------------------- SQL endpoint (part 5)


async def test_sql_reaching_outside_the_tenant_views_is_refused_unevaluated(services, receiver, webhook_id):
    async with httpx.AsyncClient(base_url=services.stack.query_url, headers=services.mallory, timeout=30) as api:
        for sql in (
            "SELECT (SELECT count() FROM spendstream_keys) AS n",
            "SELECT 1 WHERE 1 IN system.tables",
            "SELECT count() FROM usage_events WHERE EXISTS (SELECT 1 FROM system.one)",
            "SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
            "SELECT * FROM usage_events AS u JOIN system.users AS s ON 1",
            "SELECT nonexistent_column FROM usage_events",
        ):
            r = await refused(api.post("/v1/sql", json={"sql": sql}), "sql", (400, 403, 422))
            assert "Code:" not in r.text, r.text  # ClickHouse's own error text stays inside
    await normal_tenant_is_served(services, receiver, webhook_id)


# ---------------------------------------------------------------- authentication, bodies, dates (parts 6, 7)


async def test_no_key_is_401_whatever_the_body_and_bodies_are_bounded(services, receiver, webhook_id):
    stack = services.stack
    async with httpx.AsyncClient(timeout=30) as client:
        for base, path in ((stack.gateway_url, "/v1/events"), (stack.query_url, "/v1/budgets")):
            r = await client.post(base + path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert r.status_code == 401, (path, r.status_code, r.text)
        big = b'{"name": "' + b"x" * (8 * 1024 * 1024) + b'"}'
        await refused(client.post(stack.query_url + "/v1/budgets", content=big,
                                  headers={**services.mallory, "Content-Type": "application/json"}), "body", 413)  # fmt: skip
        await refused(client.post(stack.gateway_url + "/v1/events", content=big,
                                  headers={**services.mallory, "Content-Type": "application/json"}), "body", 413)  # fmt: skip
    await normal_tenant_is_served(services, receiver, webhook_id)


async def test_multi_member_gzip_is_read_whole(services, receiver, webhook_id):
    lines = [
        b'{"event_id": "gz-1", "project": "gz", "provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}\n',
        b'{"event_id": "gz-2", "project": "gz", "provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}\n',
    ]  # fmt: skip
    body = gzip.compress(lines[0]) + gzip.compress(lines[1])
    headers = {**services.mallory, "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    async with httpx.AsyncClient(base_url=services.stack.gateway_url, timeout=30) as gw:
        r = await gw.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 2, r.json()
        garbage = gzip.compress(lines[0]) + b"\x1f\x8b\x08\x00garbage"
        await refused(gw.post("/v1/events", content=garbage, headers=headers), "body")
    await normal_tenant_is_served(services, receiver, webhook_id)


async def test_dates_outside_clickhouse_range_are_refused(services, receiver, webhook_id):
    async with httpx.AsyncClient(base_url=services.stack.query_url, headers=services.mallory, timeout=30) as api:
        await refused(api.get("/v1/analytics/overview", params={"to": "9999-12-31"}), "to", (400, 422))
        await refused(api.get("/v1/analytics/overview", params={"from": "1000-01-01"}), "from", (400, 422))
        await refused(
            api.get("/v1/analytics/timeseries", params={"from": "0001-01-01", "to": "2024-01-01"}), "from", (400, 422)
        )
    await normal_tenant_is_served(services, receiver, webhook_id)
