"""The gateway publishing to the embedded broker: what lands on usage.raw, and failure answers."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from pathlib import Path

import orjson
import pytest
from gateway_support import (  # tests/integration is on sys.path
    events_by_id,
    gateway,
    raw_position,
    read_raw,
    wait_until,
)

from spendstream.embedded.kafka import EmbeddedKafka

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.kafka

ADMIN = "gateway-it-admin-key-0123456789"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PAYLOADS = {k: v for k, v in json.loads((REPO_ROOT / "tests/fixtures/provider_usage.json").read_text()).items()
            if not k.startswith("_")}  # fmt: skip


@pytest.fixture
def tenant(unique_name):
    return unique_name("gw")


@pytest.fixture
def settings(make_settings, tenant):
    return make_settings(with_clickhouse=False, bootstrap_admin_key=ADMIN, bootstrap_tenant=tenant)


async def test_accepted_events_are_on_usage_raw_keyed_by_tenant_and_project(settings, tenant):
    body = [
        {"event_id": "a-1", "project": "support", "model": "OpenAI/GPT-4o", "input_tokens": 1200,
         "output_tokens": 300, "cache_read_tokens": 1024, "timestamp": "2025-06-01T14:00:00.5+02:00",
         "tags": {"env": "prod"}, "user": "u-1", "cost_usd": 0.25},
        {"project": "support", "model": "gpt-4o", "input_tokens": -5},  # rejected
        {"project": "research", "provider": "google", "model": "gemini-2.5-flash", "usage": PAYLOADS["gemini_thinking_cached"]["usage"]},
    ]  # fmt: skip
    async with gateway(settings, ADMIN) as client:
        since = await raw_position(settings)
        answer = await client.post(
            "/v1/events", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 202, answer.text
    result = answer.json()
    assert result["accepted"] == 2
    assert result["event_ids"][0] == "a-1" and len(result["event_ids"]) == 2
    assert [(r["index"], r["errors"][0]["field"]) for r in result["rejected"]] == [(1, "input_tokens")]

    records = await read_raw(settings, tenant, 2, since)
    assert sorted(key for key, _ in records) == [f"{tenant}/research".encode(), f"{tenant}/support".encode()]
    for key, envelope in records:
        assert envelope["v"] == 1 and envelope["tenant"] == tenant
        assert key == f"{tenant}/{envelope['project']}".encode()
        assert TIMESTAMP.match(envelope["received_at"])
    published = events_by_id(records)
    assert set(published) == set(result["event_ids"])
    assert published["a-1"] == {
        "event_id": "a-1", "timestamp": "2025-06-01T12:00:00.500Z", "project": "support", "agent": "default",
        "user": "u-1", "tags": {"env": "prod"}, "provider": "openai", "model": "gpt-4o", "input_tokens": 1200,
        "output_tokens": 300, "cache_read_tokens": 1024, "cost_usd": "0.25", "status": "ok",
    }  # fmt: skip
    gemini = published[result["event_ids"][1]]
    assert (gemini["input_tokens"], gemini["output_tokens"], gemini["reasoning_tokens"]) == (1500, 1200, 1000)
    assert "usage" not in gemini
    research = next(envelope for key, envelope in records if envelope["project"] == "research")
    assert gemini["timestamp"] == research["received_at"]  # no timestamp given: the receive time


@pytest.mark.parametrize("name", sorted(PAYLOADS))
async def test_provider_usage_is_published_as_contract_fields(settings, tenant, name):
    case = PAYLOADS[name]
    event = {
        "event_id": name,
        "project": "p",
        "provider": case["provider"],
        "model": case["model"],
        "usage": case["usage"],
    }
    async with gateway(settings, ADMIN) as client:
        since = await raw_position(settings)
        answer = await client.post("/v1/events", json=event)
    assert answer.status_code == 202, answer.text
    published = events_by_id(await read_raw(settings, tenant, 1, since))[event["event_id"]]
    tokens = {k: v for k, v in published.items() if k.endswith("_tokens")}
    assert tokens == case["expected"]


async def test_gzip_ndjson_is_published(settings, tenant):
    lines = b"\n".join(
        orjson.dumps({"event_id": f"n-{i}", "project": "batch", "model": "anthropic/claude-3-5-haiku",
                      "input_tokens": 10 + i, "output_tokens": 1}) for i in range(300)
    )  # fmt: skip
    async with gateway(settings, ADMIN) as client:
        since = await raw_position(settings)
        answer = await client.post(
            "/v1/events",
            content=gzip.compress(lines),
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
        )
    assert answer.status_code == 202 and answer.json()["accepted"] == 300
    published = events_by_id(await read_raw(settings, tenant, 300, since))
    assert sorted(published) == sorted(f"n-{i}" for i in range(300))
    assert {(e["provider"], e["model"]) for e in published.values()} == {("anthropic", "claude-3-5-haiku")}


async def test_concurrent_single_posts_are_each_answered_after_their_ack(settings, tenant):
    async with gateway(settings, ADMIN) as client:
        since = await raw_position(settings)
        answers = await asyncio.gather(
            *(client.post("/v1/events", json={"event_id": f"s-{i}", "project": f"p{i % 3}", "model": "openai/gpt-4o",
                                              "input_tokens": i, "output_tokens": 1}) for i in range(60))
        )  # fmt: skip
        metrics = (await client.get("/metrics")).text
    assert [a.status_code for a in answers] == [202] * 60
    records = await read_raw(settings, tenant, 60, since)
    published = events_by_id(records)
    assert sorted(published) == sorted(f"s-{i}" for i in range(60))
    assert sum(len(env["events"]) for _, env in records) == 60  # each event exactly once
    assert all(key == f"{tenant}/{env['project']}".encode() for key, env in records)
    assert re.search(r"^spendstream_gateway_events_accepted_total 60\.0$", metrics, re.M)


async def test_readyz_reports_the_broker_but_waits_for_keys(settings):
    async with gateway(settings) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "broker": True, "api_keys_loaded": False}


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, so stopping it does not disturb the session's."""
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    yield broker
    broker.stop()


async def test_broker_stopped_answers_503_and_reports_nothing_accepted(make_settings, tenant, own_broker):
    settings = make_settings(
        with_clickhouse=False, bootstrap_admin_key=ADMIN, bootstrap_tenant=tenant,
        kafka={"bootstrap_servers": own_broker.bootstrap, "send_timeout_s": 1.0},
    )  # fmt: skip
    event = {"project": "p", "model": "openai/gpt-4o", "input_tokens": 1, "output_tokens": 1}
    async with gateway(settings, ADMIN) as client:
        assert (await client.post("/v1/events", json=event)).status_code == 202
        own_broker.stop()
        started = time.monotonic()
        answer = await client.post("/v1/events", json=[event, event])  # waiting when the connection broke, or after
        first_s = time.monotonic() - started
        started = time.monotonic()
        later = await client.post("/v1/events", json=event)  # the connection is known lost: waits for it
        later_s = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
        ready = await client.get("/readyz")
    for refused in (answer, later):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "broker_unavailable"
        assert "accepted" not in refused.json() and "event_ids" not in refused.json()
        assert int(refused.headers["retry-after"]) > 0
    assert first_s < 5, first_s
    assert 0.9 <= later_s < 5, later_s  # the configured send timeout, not aiokafka's 30 s
    assert re.search(r"^spendstream_gateway_events_accepted_total 1\.0$", metrics, re.M)
    assert 'spendstream_gateway_events_rejected_total{reason="broker_unavailable"} 3.0' in metrics
    assert ready.status_code == 503 and ready.json()["broker"] is False


async def test_saturated_producer_answers_429(make_settings, tenant, own_broker):
    settings = make_settings(
        with_clickhouse=False, bootstrap_admin_key=ADMIN, bootstrap_tenant=tenant,
        kafka={"bootstrap_servers": own_broker.bootstrap, "send_timeout_s": 2.0},
        gateway={"max_in_flight_events": 3},
    )  # fmt: skip
    event = {"project": "p", "model": "openai/gpt-4o", "input_tokens": 1, "output_tokens": 1}
    async with gateway(settings, ADMIN) as client:
        own_broker.stop()

        async def noticed() -> bool:
            return (await client.get("/readyz")).json()["broker"] is False

        await wait_until(noticed)  # from now on the first request holds its 2 events waiting for the broker
        waiting = asyncio.create_task(client.post("/v1/events", json=[event, event]))

        async def holding() -> bool:
            return client.app.state.publisher.in_flight > 0 or waiting.done()  # type: ignore[attr-defined]

        await wait_until(holding, timeout=10)
        assert not waiting.done(), waiting.result().text
        refused = await client.post("/v1/events", json=[event, event])
        first = await waiting
    assert refused.status_code == 429
    assert refused.json()["error"] == "saturated" and refused.headers["retry-after"] == "1"
    assert first.status_code == 503


async def test_gateway_recovers_by_itself_when_the_broker_comes_back(make_settings, tenant, own_broker):
    settings = make_settings(
        with_clickhouse=False, bootstrap_admin_key=ADMIN, bootstrap_tenant=tenant,
        kafka={"bootstrap_servers": own_broker.bootstrap, "send_timeout_s": 1.0},
    )  # fmt: skip

    def event(event_id: str) -> dict:
        return {"event_id": event_id, "project": "p", "model": "openai/gpt-4o", "input_tokens": 1, "output_tokens": 1}

    async with gateway(settings, ADMIN) as client:
        assert (await client.post("/v1/events", json=event("before"))).status_code == 202
        own_broker.stop()
        down = await client.post("/v1/events", json=event("down"))
        assert down.status_code == 503, down.text
        own_broker.start()  # same port; memory only, so usage.raw is gone too
        answers = []

        async def accepted() -> bool:
            answers.append(await client.post("/v1/events", json=event("after")))
            return answers[-1].status_code == 202

        started = time.monotonic()
        await wait_until(accepted, timeout=15, interval=0.1)
        recovered_s = time.monotonic() - started
    assert {a.status_code for a in answers} <= {202, 503}, [a.text for a in answers]
    assert recovered_s < 10, recovered_s
    records = await read_raw(settings, tenant, 1)
    # "down" may be there too: its 503 said "not accepted", aiokafka still delivered it late (at least once)
    assert "after" in events_by_id(records)
