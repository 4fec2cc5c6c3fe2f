"""The whole write path as it runs in production: `spendstream gateway`, `spendstream processors
--stages pricing` and `--stages sink` as child processes (spendstream.devstack.Stack) on a broker
and a ClickHouse database of this test's own.

- Events posted to the gateway (with client retries of whole requests) end up in usage_events
  exactly once: count and sum(cost_nanos) equal the input, and every aggregate equals usage_events.
- The pricing corpus (tests/fixtures/pricing_corpus.ndjson) through the pipeline: every stored cost
  equals genai-prices' own calc_price at the event's time, to the nano-USD.
- `spendstream processors --stages pricing,sink` (several stages, one command) runs them as
  children behind one /healthz and /metrics.

CI size: 5,000 events. The acceptance size: ``SPENDSTREAM_E2E_EVENTS=100000``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import secrets
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from stage_support import (
    FAST_BATCHING,
    StageWorker,
    assert_aggregates_match,
    make_event,
    migrate,
    produce,
    raw_record,
    read_topic,
    stored_totals,
    wait_committed,
)

from spendstream.clickhouse import get_client
from spendstream.contracts import usd_to_nanos
from spendstream.devstack import Stack
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.pricing import default_catalog, price
from spendstream.topics import USAGE_PRICED, USAGE_RAW, ensure_topics_sync

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.clickhouse]

EVENTS = int(os.environ.get("SPENDSTREAM_E2E_EVENTS", "5000"))
BATCH = 100
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-3-5-sonnet-20241022"), ("google", "gemini-1.5-pro"),
          ("openai", "gpt-4o-mini"), ("acme", "in-house-model")]  # fmt: skip


@pytest.fixture
def pipeline(make_settings, tmp_path, monkeypatch):
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap}, bootstrap_admin_key=key)
    migrate(settings)
    ensure_topics_sync(settings)
    # Stack passes the connection settings; the children's data goes under this test's directory
    monkeypatch.setenv("SPENDSTREAM_DATA_DIR", settings.data_dir)
    stack = Stack(settings, tmp_path / "stack", components=("gateway", "pricing", "sink"))
    stack.start(supervise=False)
    try:
        yield settings, stack, key
    finally:
        stack.stop()
        broker.stop()


async def post_all(stack: Stack, key: str, batches: list[list[dict]], concurrency: int = 4) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    queue = list(batches)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            response = await client.post("/v1/events", json=body, headers=headers)
            assert response.status_code == 202, response.text

    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


async def drained(settings, n_events: int, timeout: float = 300.0) -> None:
    """Until usage_events holds ``n_events`` and both stages committed everything they read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = get_client(settings)
    try:
        while client.query("SELECT count() FROM usage_events").result_rows[0][0] < n_events:
            assert loop.time() < deadline, "usage_events never reached the input count"
            await asyncio.sleep(0.2)
    finally:
        client.close()
    for topic, group in ((USAGE_RAW.name, "spendstream-pricing"), (USAGE_PRICED.name, "spendstream-sink")):
        records = await read_topic(settings, topic, lambda rs, _t=topic: bool(rs), what="some records")
        # read again until idle: the log may still grow while the first read runs
        records = await read_topic(settings, topic, lambda rs, n=len(records): len(rs) >= n)
        ends: dict[int, int] = {}
        for r in records:
            ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
        await wait_committed(settings, group, topic, ends, timeout=60)


async def test_events_through_gateway_pricing_and_sink(pipeline):
    settings, stack, key = pipeline
    rng = random.Random(3)
    catalog = default_catalog()
    events = []
    for i in range(EVENTS):
        provider, model = MODELS[i % len(MODELS)]
        events.append(make_event(f"e2e-{i}", f"proj-{i % 10}", i, provider=provider, model=model,
                                 timestamp=f"2025-06-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z"))  # fmt: skip
    expected_cost = sum(price(e, catalog).cost_nanos for e in events)
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    retries = rng.sample(batches, max(1, len(batches) // 20))  # clients re-posting whole requests
    await post_all(stack, key, batches + retries)
    await drained(settings, EVENTS)

    totals = await asyncio.to_thread(stored_totals, settings)
    assert totals["event_ids"] == (EVENTS, EVENTS)
    assert totals["usage_events"][0] == EVENTS
    assert totals["usage_events"][5] == expected_cost
    assert_aggregates_match(totals)


def _corpus_reference():
    spec = importlib.util.spec_from_file_location("make_pricing_corpus", FIXTURES / "make_pricing_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.genai_usage


async def test_pricing_corpus_costs_equal_calc_price_after_the_pipeline(pipeline):
    from genai_prices import calc_price

    settings, stack, key = pipeline
    corpus = [json.loads(line) for line in (FIXTURES / "pricing_corpus.ndjson").read_text().splitlines() if line]
    await post_all(stack, key, [corpus[i : i + 50] for i in range(0, len(corpus), 50)])
    await drained(settings, len(corpus))

    client = get_client(settings)
    rows = client.query("SELECT event_id, cost_nanos, pricing_status, price_source FROM usage_events").result_rows
    client.close()
    stored = {event_id: (cost, status, source) for event_id, cost, status, source in rows}
    assert len(rows) == len(stored) == len(corpus)

    genai_usage = _corpus_reference()
    checked, mismatches = 0, []
    for event in corpus:
        got = stored[event["event_id"]]
        tags = event["tags"]
        if event.get("cost_usd") is not None:
            want = (usd_to_nanos(event["cost_usd"]), "client", "client")
        elif tags["corpus.case"] == "unknown":
            want = (0, "unknown_model", "none")
        else:
            calc = calc_price(
                genai_usage(event), tags["corpus.ref_model"], provider_id=tags["corpus.ref_provider"],
                genai_request_timestamp=datetime.fromisoformat(event["timestamp"]),
            )  # fmt: skip
            want = (usd_to_nanos(calc.total_price), "priced", "catalog")
            checked += 1
        if got != want:
            mismatches.append((event["event_id"], event["provider"], event["model"], got, want))
    assert not mismatches, mismatches
    assert checked >= 450


async def test_one_processors_command_runs_each_stage_as_a_child(make_settings, tmp_path):
    """`spendstream processors --stages pricing,sink`: one child per stage; the parent serves the
    combined /healthz and /metrics on the configured port and stops its children on SIGTERM."""
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    try:
        settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap}, **FAST_BATCHING)
        migrate(settings)
        events = [make_event(f"multi-{i}", f"proj-{i % 3}", i) for i in range(300)]
        await produce(settings, USAGE_RAW.name, [raw_record("acme", e["project"], [e]) for e in events])
        worker = StageWorker(settings, "pricing,sink", tmp_path)
        try:
            await asyncio.to_thread(worker.wait_healthy)
            await drained(settings, len(events))
            metrics = worker.metrics()
            group = os.getpgid(worker.proc.pid)
        finally:
            assert worker.stop() == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # no child outlived the parent
    finally:
        broker.stop()
    assert metrics["spendstream_pricing_records_total"] == len(events)
    assert metrics["spendstream_sink_rows_total"] == len(events)
