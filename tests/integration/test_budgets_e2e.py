"""Gateway -> pricing -> budgets, each its own process (spendstream.devstack.Stack), and the
gateway's budget check answering from its view of spendstream.budget.state:
thresholds 50/80/100 of an enforced budget fire once each with the figures of the events the
gateway accepted, and the check turns to ``allowed: false`` once the budget is exhausted."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import orjson
import pytest
from stage_support import read_topic

from spendstream.budgets import Budget
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.devstack import Stack
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.topics import BUDGET_ALERTS

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

ADMIN_KEY = "ss_test_admin_" + "e" * 24
TENANT = "e2e-budgets"


@pytest.fixture
def stack(make_settings, tmp_path):
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    settings = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap}, bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT,
        processors={"batch_max_seconds": 0.05},
    )  # fmt: skip
    from spendstream.migrate import main as migrate_main

    assert migrate_main(settings) == 0
    client = get_client(settings)
    try:
        insert_budget(client, Budget(TENANT, "b-hard", "hard stop", {"project": "checkout"}, "total", "UTC",
                                     5_000_000_000, forecast=False, enforce=True), version=1)  # fmt: skip
        insert_budget(client, Budget(TENANT, "b-soft", "soft", {}, "total", "UTC", 100_000_000_000, forecast=False),
                      version=1)  # fmt: skip
    finally:
        client.close()
    running = Stack(settings, tmp_path, components=("gateway", "pricing", "budgets")).start(supervise=False)
    try:
        with httpx.Client(base_url=running.gateway_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            yield settings, http
    finally:
        running.stop()
        broker.stop()


def check(http: httpx.Client, scope: dict, estimate: str = "0") -> dict:
    deadline = time.monotonic() + 30
    while True:
        r = http.post("/v1/budgets/check", json={"scope": scope, "estimated_cost_usd": estimate})
        if r.status_code != 503:  # 503 = the view is still loading
            assert r.status_code == 200, r.text
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def wait_check(http: httpx.Client, scope: dict, done, what: str) -> dict:
    deadline = time.monotonic() + 30
    while not done(answer := check(http, scope)):
        assert time.monotonic() < deadline, f"{what}: last answer {answer}"
        time.sleep(0.05)
    return answer


async def test_alerts_and_enforced_check_through_the_pipeline(stack):
    settings, http = stack
    scope = {"project": "checkout", "agent": "cart-bot"}
    first = check(http, scope, "4.99")
    assert first["allowed"] is True
    assert {b["id"]: (b["spent_usd"], b["remaining_usd"]) for b in first["budgets"]} == {
        "b-hard": ("0.000000000", "5.000000000"),
        "b-soft": ("0.000000000", "100.000000000"),
    }
    assert check(http, scope, "5.01")["allowed"] is False  # the estimate alone would exceed it
    assert [b["id"] for b in check(http, {"project": "search"})["budgets"]] == ["b-soft"]

    # $1.00 per event (client-priced, so the cost is exact); 50 % at the 3rd, 80 % at the 4th,
    # 100 % at the 5th
    for i in range(5):
        event = {"event_id": f"buy-{i}", "project": "checkout", "agent": "cart-bot", "provider": "openai",
                 "model": "gpt-4o", "input_tokens": 100, "output_tokens": 10, "cost_usd": "1.00"}  # fmt: skip
        assert http.post("/v1/events", json=event).status_code == 202
        if i == 1:
            mid = wait_check(http, scope, lambda a: {b["spent_usd"] for b in a["budgets"]} == {"2.000000000"},
                             "spend visible")  # fmt: skip
            assert mid["allowed"] is True
    alerts = await read_topic(settings, BUDGET_ALERTS.name, lambda rs: len(rs) >= 3, what="three alerts")
    values = sorted((orjson.loads(r.value) for r in alerts), key=lambda v: Decimal(v["threshold"]))
    assert [(v["budget_id"], v["threshold"], v["spent_usd"], v["event_id"], v["percent_used"]) for v in values] == [
        ("b-hard", "50", "3.000000000", "buy-2", "60.00"),
        ("b-hard", "80", "4.000000000", "buy-3", "80.00"),
        ("b-hard", "100", "5.000000000", "buy-4", "100.00"),
    ]
    assert values[0]["top"][0] == {"kind": "agent", "name": "cart-bot", "spent_usd": "3.000000000"}

    exhausted = wait_check(http, scope, lambda a: not a["allowed"], "deny after exhaustion")
    hard = next(b for b in exhausted["budgets"] if b["id"] == "b-hard")
    assert hard == {**hard, "spent_usd": "5.000000000", "remaining_usd": "0.000000000", "percent_used": "100.00",
                    "enforce": True, "allowed": False}  # fmt: skip
    # budgets that do not cover the call are not consulted
    other = check(http, {"project": "search"})
    assert other["allowed"] is True and [b["spent_usd"] for b in other["budgets"]] == ["5.000000000"]

    assert http.post("/v1/budgets/check", json={"scope": {"colour": "red"}}).json()["field"] == "scope.colour"
    assert http.post("/v1/budgets/check", json={"estimated_cost_usd": "-1"}).status_code == 422
    assert httpx.post(f"{http.base_url}/v1/budgets/check", json={}).status_code == 401
