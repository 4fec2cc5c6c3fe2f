"""Alerts end to end, as production runs them: `spendstream query-api`, `gateway`, `processors
--stages pricing|budgets|notify` as child processes (spendstream.devstack.Stack) on a broker and a
ClickHouse database of this test's own, and a real webhook receiver.

A budget with thresholds 50/80/100 % and a generic webhook, both created through the query API;
events posted to the gateway cross each threshold once: every threshold reaches the receiver
exactly once, signed, with the figures at the crossing event, and GET /v1/alerts shows the three
alerts delivered.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path

import httpx
import pytest
from stage_support import log_ends, migrate, read_topic, wait_committed

from spendstream.alerting import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature
from spendstream.devstack import Stack
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.ports import free_port_run
from spendstream.topics import BUDGET_ALERTS, ensure_topics_sync
from stream_processors.stages import STAGES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from notify_support import Receiver, wait_until  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.clickhouse]

PROJECT = "alerts-e2e"
EVENT_USD = "0.10"
#: 12 events of 0.10 USD against 1.00 USD: 50 % is crossed by the 5th, 80 % by the 8th, 100 % by the 10th
CROSSINGS = {"50": ("e2e-alert-04", "0.500000000"), "80": ("e2e-alert-07", "0.800000000"),
             "100": ("e2e-alert-09", "1.000000000")}  # fmt: skip


@pytest.fixture
def stack(make_settings, tmp_path, monkeypatch):
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    key = "ss_test_" + secrets.token_urlsafe(16)
    # the stages listen on web_port + i: make_settings checks only web_port itself, and a busy
    # neighbour made a stage exit at start-up ("address already in use")
    settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap}, bootstrap_admin_key=key,
                             processors={"web_port": free_port_run(len(STAGES))},
                             notify={"webhook": {"allow_private": True}})  # fmt: skip
    migrate(settings)
    ensure_topics_sync(settings)
    monkeypatch.setenv("SPENDSTREAM_DATA_DIR", settings.data_dir)
    stack = Stack(settings, tmp_path / "stack", components=("gateway", "pricing", "budgets", "notify", "query-api"))
    try:
        yield settings, stack, key
    finally:
        stack.stop()
        broker.stop()


async def test_each_threshold_reaches_the_receiver_exactly_once(stack):
    settings, stack, key = stack
    auth = {"Authorization": f"Bearer {key}"}
    async with Receiver() as receiver:
        await asyncio.to_thread(stack.start_component, "query-api")
        async with httpx.AsyncClient(base_url=stack.query_url, headers=auth, timeout=30) as api:
            created = await api.post("/v1/webhooks", json={"url": receiver.url("/alerts")})
            assert created.status_code == 201, created.text
            webhook = created.json()
            budget = await api.post("/v1/budgets", json={
                "name": "e2e budget", "scope": {"project": PROJECT}, "window": "total", "limit_usd": "1.00",
                "thresholds": [50, 80, 100], "forecast": False, "channels": [webhook["id"]],
            })  # fmt: skip
            assert budget.status_code == 201, budget.text
            budget_id = budget.json()["id"]
        # the stages start after the budget exists: the budgets stage's first load holds it
        for name in ("gateway", "pricing", "budgets", "notify"):
            await asyncio.to_thread(stack.start_component, name)

        async with httpx.AsyncClient(base_url=stack.gateway_url, headers=auth, timeout=30) as gateway:
            for i in range(12):
                response = await gateway.post("/v1/events", json={
                    "event_id": f"e2e-alert-{i:02d}", "project": PROJECT, "provider": "openai", "model": "gpt-4o",
                    "input_tokens": 100, "output_tokens": 20, "cost_usd": EVENT_USD,
                })  # fmt: skip
                assert response.status_code == 202, response.text

        await wait_until(lambda: len(receiver.at("/alerts")) >= 3, "three alerts at the receiver", timeout=90, step=0.1)
        # everything on budget.alerts read and acked by notify: a duplicate would have arrived by now
        records = await read_topic(settings, BUDGET_ALERTS.name, lambda rs: len(rs) >= 3, what="three alerts")
        await wait_committed(settings, "spendstream-notify", BUDGET_ALERTS.name, log_ends(records))
        received = list(receiver.at("/alerts"))

        async with httpx.AsyncClient(base_url=stack.query_url, headers=auth, timeout=30) as api:

            async def history() -> list[dict]:
                return (await api.get("/v1/alerts", params={"budget_id": budget_id})).json()["alerts"]

            deadline = time.monotonic() + 30
            alerts = await history()
            while sorted(a["delivery_status"] for a in alerts) != ["delivered"] * 3:
                assert time.monotonic() < deadline, f"alert history never showed three delivered alerts: {alerts}"
                await asyncio.sleep(0.2)
                alerts = await history()

    assert len(received) == 3, [r.json() for r in received]
    bodies = {r.json()["threshold"]: r for r in received}
    assert set(bodies) == set(CROSSINGS)
    for threshold, (event_id, spent) in CROSSINGS.items():
        request = bodies[threshold]
        body = request.json()
        assert verify_signature(webhook["secret"], request.headers[SIGNATURE_HEADER], request.body, time.time())
        assert request.headers[IDEMPOTENCY_HEADER] == body["alert_id"]
        assert (body["budget_id"], body["kind"], body["event_id"], body["spent_usd"], body["limit_usd"]) == (
            budget_id,
            "threshold",
            event_id,
            spent,
            "1.000000000",
        )
        assert body["scope"] == {"project": PROJECT} and body["window"] == "total"
    assert len({r.json()["alert_id"] for r in received}) == 3
    assert {a["alert_id"] for a in alerts} == {r.json()["alert_id"] for r in received}
    assert all([(d["channel"], d["attempts"]) for d in a["deliveries"]] == [(webhook["id"], 1)] for a in alerts)
