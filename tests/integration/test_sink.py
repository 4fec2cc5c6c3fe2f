"""The sink as `spendstream processors --stages sink` on a real broker and ClickHouse.

Its input is what the pricing stage writes (``PricingStage.process`` over raw records), including
the records a crashed pricing stage emits twice. Every test ends with usage_events and every
aggregate equal to the input, exactly:
- replays and garbage in the input;
- the sink SIGKILLed at random points while input keeps arriving (at least 5 kills; 30k events,
  ``SPENDSTREAM_SINK_CRASH_EVENTS=200000`` for the acceptance size);
- ClickHouse stopped for a few seconds mid-stream, then started again.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from pathlib import Path

import orjson
import pytest
from stage_support import (
    FAST_PROCESSORS,
    StageWorker,
    assert_aggregates_match,
    make_event,
    migrate,
    produce,
    raw_record,
    read_topic,
    stage_settings,  # noqa: F401 - fixture
    stored_totals,
    wait_committed,
)

from spendstream.embedded.clickhouse import EmbeddedClickHouse
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.pricing import default_catalog
from spendstream.topics import USAGE_DLQ, USAGE_PRICED, USAGE_RAW
from stream_processors.pricing.logic import PricingStage, RawRecord

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

GROUP = "spendstream-sink"
PARTITIONS = 4
#: events of the SIGKILL test; the acceptance size is SPENDSTREAM_SINK_CRASH_EVENTS=200000
CRASH_EVENTS = int(os.environ.get("SPENDSTREAM_SINK_CRASH_EVENTS", "30000"))


class PricedFeed:
    """Priced records as the pricing stage emits them, per partition in src order, with totals."""

    def __init__(self, seed: int, events_per_record: int = 15):
        self.rng = random.Random(seed)
        self.stage = PricingStage(default_catalog(), USAGE_RAW.name, 48 * 3_600_000)
        self.events_per_record = events_per_record
        self.next_offset = dict.fromkeys(range(PARTITIONS), 0)
        self.emitted: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
        self.events = 0
        self.cost_nanos = 0
        self.records_out = 0

    def chunk(self, records_per_partition: int, replay_every: int = 0) -> list[tuple[bytes, bytes, int]]:
        """New priced records for every partition; with ``replay_every``, the last few records of a
        partition are re-emitted every that many records, as after a pricing-stage crash."""
        out: list[tuple[bytes, bytes, int]] = []
        for p in range(PARTITIONS):
            for _ in range(records_per_partition):
                o = self.next_offset[p]
                self.next_offset[p] += 1
                project = f"proj-{p}"  # partition p holds one project: its own src sequence
                events = [make_event(f"{p}-{o}-{j}", project, o * self.events_per_record + j)
                          for j in range(self.events_per_record)]  # fmt: skip
                key, value = raw_record("acme", project, events)
                priced = self.stage.process([RawRecord(p, o, key, value)], 0).priced[0].value
                self.emitted[p].append(priced)
                out.append((key, priced, p))
                envelope = orjson.loads(priced)
                self.events += len(envelope["events"])
                self.cost_nanos += sum(e["cost_nanos"] for e in envelope["events"])
                if replay_every and o % replay_every == replay_every - 1:
                    back = self.rng.randint(1, 5)
                    out += [(key, v, p) for v in self.emitted[p][-back:]]
        self.records_out += len(out)
        return out


async def wait_stored(settings, n_records: int, timeout: float = 90.0) -> dict:
    """Wait until the sink committed all ``n_records`` of its input, then return the stored totals."""
    records = await read_topic(settings, USAGE_PRICED.name, lambda rs: len(rs) >= n_records)
    ends = {}
    for r in records:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    await wait_committed(settings, GROUP, USAGE_PRICED.name, ends, timeout)
    return await asyncio.to_thread(stored_totals, settings)


def assert_exact(totals: dict, feed: PricedFeed) -> None:
    count, _errors, *_rest = totals["usage_events"]
    assert totals["event_ids"] == (feed.events, feed.events)
    assert (count, totals["usage_events"][5]) == (feed.events, feed.cost_nanos)
    assert_aggregates_match(totals)


async def test_replays_and_garbage(stage_settings, tmp_path):
    s = stage_settings
    feed = PricedFeed(seed=1)
    records = feed.chunk(60, replay_every=10)
    records.insert(30, (b"acme/proj-1", b"not an envelope", 1))
    records.insert(90, (b"acme/proj-2", orjson.dumps({"v": 1, "tenant": "acme"}), 2))
    await produce(s, USAGE_PRICED.name, records)
    worker = StageWorker(s, "sink", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        totals = await wait_stored(s, len(records))
        dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 2)
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert_exact(totals, feed)
    dead = [orjson.loads(r.value) for r in dlq]
    assert sorted(base64.b64decode(d["value_b64"]) for d in dead) == sorted([records[30][1], records[90][1]])
    assert {(d["stage"], d["src"]["topic"]) for d in dead} == {("sink", USAGE_PRICED.name)}
    assert metrics['spendstream_sink_records_total{outcome="replay_skipped"}'] == len(records) - 2 - 60 * PARTITIONS
    assert metrics["spendstream_sink_rows_total"] == feed.events


async def test_sigkill_at_random_points(stage_settings, tmp_path):
    s = stage_settings
    rng = random.Random(5)
    feed = PricedFeed(seed=2)
    worker = StageWorker(s, "sink", tmp_path)

    async def feed_slowly() -> None:
        while feed.events < CRASH_EVENTS:  # chunks of 4 partitions x 20 records x 15 events
            await produce(s, USAGE_PRICED.name, feed.chunk(20, replay_every=7))
            await asyncio.sleep(0.25)  # input keeps arriving across the kills

    producer = asyncio.create_task(feed_slowly())
    kills = 0
    try:
        while kills < 5 or not producer.done():
            await asyncio.to_thread(worker.wait_healthy)
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            worker.kill()
            kills += 1
            worker.restart()
        await producer
        await asyncio.to_thread(worker.wait_healthy)
        totals = await wait_stored(s, feed.records_out)
    finally:
        producer.cancel()
        worker.stop()
    assert kills >= 5
    assert feed.events >= CRASH_EVENTS
    assert_exact(totals, feed)


async def test_clickhouse_outage(make_settings, tmp_path: Path):
    clickhouse = EmbeddedClickHouse(path=str(tmp_path / "chdb")).start()
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    s = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap}, clickhouse={"url": clickhouse.url}, processors=FAST_PROCESSORS
    )
    migrate(s)
    feed = PricedFeed(seed=3)
    worker = StageWorker(s, "sink", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        await produce(s, USAGE_PRICED.name, feed.chunk(20, replay_every=7))
        await wait_stored(s, feed.records_out)
        await asyncio.to_thread(clickhouse.stop)
        # input keeps arriving while ClickHouse is down; the sink must hold it, not skip it
        for _ in range(10):
            await produce(s, USAGE_PRICED.name, feed.chunk(10, replay_every=7))
            await asyncio.sleep(0.5)
        assert worker.alive()
        retries = worker.metrics().get('spendstream_stage_io_retries_total{stage="sink",target="clickhouse insert"}', 0)
        assert retries > 0, "the sink did not notice the outage"
        await asyncio.to_thread(clickhouse.start)
        await produce(s, USAGE_PRICED.name, feed.chunk(10, replay_every=7))
        totals = await wait_stored(s, feed.records_out)
    finally:
        worker.stop()
        broker.stop()
        clickhouse.stop()
    assert_exact(totals, feed)
