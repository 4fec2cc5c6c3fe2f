"""The sink as `spendstream processors --stages sink` on a real broker and ClickHouse.

Its input is what the pricing stage writes (``PricingStage.process`` over raw records, with its
headers; every fifth record without them, as an older producer would write it), including the
records a crashed pricing stage emits twice. Every test ends with usage_events and every
aggregate equal to the input, exactly:
- replays and garbage in the input (also a record with headers whose value ClickHouse refuses);
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
    FAST_BATCHING,
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

from spendstream.clickhouse import get_client
from spendstream.contracts import priced_envelope, priced_headers, raw_envelope
from spendstream.embedded.clickhouse import EmbeddedClickHouse
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.pricing import default_catalog
from spendstream.timeutil import TimestampParser
from spendstream.topics import USAGE_DLQ, USAGE_PRICED, USAGE_RAW
from stream_processors.pricing.logic import PricingStage, RawRecord
from stream_processors.sink.logic import json_rows, plan_inserts, read_priced
from stream_processors.sink.writer import INSERT_SETTINGS, UsageEventsWriter

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

    def chunk(self, records_per_partition: int, replay_every: int = 0) -> list[tuple[bytes, bytes, int, list]]:
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
                output = self.stage.process([RawRecord(p, o, key, value)], 0).priced[0]
                record = (key, output.value, p, output.headers if o % 5 else [])
                self.emitted[p].append(record)
                out.append(record)
                envelope = orjson.loads(output.value)
                self.events += len(envelope["events"])
                self.cost_nanos += sum(e["cost_nanos"] for e in envelope["events"])
                if replay_every and o % replay_every == replay_every - 1:
                    back = self.rng.randint(1, 5)
                    out += self.emitted[p][-back:]
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
    # headers say it is the pricing stage's, so only ClickHouse reads it, and refuses it
    refused = orjson.dumps(orjson.loads(records[0][1]) | {"src": {"partition": 3, "offset": 10_000},
                                                           "events": [{"event_id": "x", "input_tokens": "many"}]})  # fmt: skip
    records.append((b"acme/proj-3", refused, 3, priced_headers(3, 10_000, 1)))
    await produce(s, USAGE_PRICED.name, records)
    worker = StageWorker(s, "sink", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        totals = await wait_stored(s, len(records))
        dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 3)
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert_exact(totals, feed)
    dead = [orjson.loads(r.value) for r in dlq]
    assert sorted(base64.b64decode(d["value_b64"]) for d in dead) == sorted([records[30][1], records[90][1], refused])
    assert {(d["stage"], d["src"]["topic"]) for d in dead} == {("sink", USAGE_PRICED.name)}
    assert metrics['spendstream_sink_records_total{outcome="replay_skipped"}'] == len(records) - 3 - 60 * PARTITIONS
    assert metrics['spendstream_sink_records_total{outcome="refused"}'] == 1
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
        kafka={"bootstrap_servers": broker.bootstrap}, clickhouse={"url": clickhouse.url}, **FAST_BATCHING
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


def test_an_insert_retried_after_a_partial_failure_is_stored_once(make_settings, tmp_path: Path):
    """Through usage_events_in's view, usage_events and every aggregate: a view on usage_events
    fails after usage_events took the rows, and the retry with the same token adds nothing twice.
    In-process chDB: its streaming inserts (the embedded HTTP server's) do not report a failing
    view, so the failure is only visible through a plain query."""
    import chdb

    s = make_settings(clickhouse={"url": f"chdb://{tmp_path / 'chdb'}"})
    migrate(s)
    db = s.clickhouse.database
    conn = chdb.connect(str(tmp_path / "chdb"))
    feed = PricedFeed(seed=4)
    records = [read_priced(p, o, 1_000, v, h, TimestampParser()) for o, (_, v, p, h) in enumerate(feed.chunk(5))]
    insert = plan_inserts(USAGE_PRICED.name, records, 10_000)[0]
    settings = ", ".join(
        f"{k} = {v!r}" for k, v in {**INSERT_SETTINGS, "insert_deduplication_token": insert.token}.items()
    )
    sql = f"INSERT INTO {db}.usage_events_in SETTINGS {settings} FORMAT JSONEachRow\n".encode() + json_rows(records)
    conn.query(f"CREATE TABLE {db}.boom (n UInt64) ENGINE = MergeTree ORDER BY n")
    conn.query(
        f"CREATE MATERIALIZED VIEW {db}.zz_boom_mv TO {db}.boom AS SELECT throwIf(count() > 0, 'boom') AS n FROM {db}.usage_events"
    )
    with pytest.raises(Exception, match="boom"):
        conn.query(sql)
    conn.query(f"DROP TABLE {db}.zz_boom_mv")
    partial = stored_totals(s)
    assert partial["usage_events"][0] == feed.events, "usage_events took the rows before the failure"
    for _ in range(2):
        conn.query(sql)
        totals = stored_totals(s)
        assert_exact(totals, feed)
    conn.close()


#: one ClickHouse lifetime of the test below: migrates when asked (in this same process, as a server
#: runs its migrations), runs each statement of the file it is given, prints the last one's answer
_CHDB_LIFETIME = """
import sys, chdb
conn = chdb.connect(sys.argv[1])  # first: the engine lives until its last connection closes
if sys.argv[3] == "migrate":
    from spendstream.migrate import main
    from spendstream.settings import Settings
    assert main(Settings()) == 0
for sql in open(sys.argv[2], "rb").read().split(b"\\n;;\\n"):
    answer = conn.query(sql, "TSVRaw")
print(answer.bytes().decode(), end="")
conn.close()
"""


def test_a_retry_across_a_restart_after_modify_query_is_stored_once(make_settings, tmp_path: Path):
    """The fault suite's double count, made deterministic: an insert whose views committed but whose
    usage_events part did not when ClickHouse died, retried with the same token after the restart.
    The server that ran 0009's MODIFY QUERY derives other dedup block ids for the views' targets
    than a restarted one; 0014 reloads those views, so the retry adds nothing twice. The kill is
    played by separate processes (one ClickHouse lifetime each) and by dropping usage_events' part,
    which drops its dedup entry too, as if that part had never committed."""
    import subprocess
    import sys

    path = tmp_path / "chdb"
    s = make_settings(with_clickhouse=False, clickhouse={"url": f"chdb://{path}"})
    db = s.clickhouse.database
    feed = PricedFeed(seed=5)
    records = [read_priced(p, o, 1_000, v, h, TimestampParser()) for o, (_, v, p, h) in enumerate(feed.chunk(5))]
    insert = plan_inserts(USAGE_PRICED.name, records, 10_000)[0]
    settings = ", ".join(
        f"{k} = {v!r}" for k, v in {**INSERT_SETTINGS, "insert_deduplication_token": insert.token}.items()
    )
    sql = f"INSERT INTO {db}.usage_events_in SETTINGS {settings} FORMAT JSONEachRow\n".encode() + json_rows(records)
    parts = f"SELECT name FROM system.parts WHERE database = '{db}' AND table = 'usage_events' AND active".encode()

    env = {**os.environ, "SPENDSTREAM_CLICKHOUSE__URL": s.clickhouse.url, "SPENDSTREAM_CLICKHOUSE__DATABASE": db}

    def lifetime(*statements: bytes, migrate: bool = False) -> str:
        script = tmp_path / "lifetime.sql"
        script.write_bytes(b"\n;;\n".join(statements))
        run = [sys.executable, "-c", _CHDB_LIFETIME, str(path), str(script), "migrate" if migrate else "-"]
        done = subprocess.run(run, timeout=300, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    # the first lifetime migrates (0009's MODIFY QUERY included) and takes the insert
    part = lifetime(sql, parts, migrate=True).split()[-1]
    # the next: usage_events' part goes (as if it had not committed) and the sink retries the insert
    lifetime(f"ALTER TABLE {db}.usage_events DROP PART '{part}'".encode(), sql)
    assert_exact(stored_totals(s), feed)


def test_clickhouse_reads_a_priced_record_as_the_contract_says(stage_settings):
    """Absent fields take the contract's defaults; src, position and costs land in their columns."""
    sparse = {"event_id": "bare", "timestamp": "2025-03-01T12:00:00Z", "provider": "x", "model": "y",
              "cost_nanos": 0, "pricing_status": "unknown_model", "price_source": "none"}  # fmt: skip
    full = {"event_id": "full", "timestamp": "2025-03-01T12:00:00.250Z", "agent": "a1", "user": "u", "tags": {"k": "v"},
            "provider": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300, "latency_ms": 20,
            "status": "error", "cost": {"input": 3000, "output": 4000}, "cost_nanos": 7000, "cost_usd": None,
            "price_id": "openai/gpt-4o@base", "pricing_status": "priced", "price_source": "catalog"}  # fmt: skip
    envelope = priced_envelope(raw_envelope("t1", "p1", "2025-03-01T12:00:01.000Z", []), 2, 40, [sparse, full])
    record = read_priced(3, 7, 1_000, orjson.dumps(envelope), priced_headers(2, 40, 2), TimestampParser())
    writer = UsageEventsWriter(stage_settings)
    try:
        writer.insert(plan_inserts(USAGE_PRICED.name, [record], 100)[0])
        columns = (
            "agent, user, status, latency_ms, tags, input_tokens, cost_nanos, cost_input_nanos, cost_output_nanos, "
        )
        columns += (
            "cost_request_nanos, price_id, toUnixTimestamp64Milli(timestamp), toUnixTimestamp64Milli(received_at), "
        )
        columns += "tenant, project, partition, offset, src_partition, src_offset"
        rows = get_client(stage_settings).query(f"SELECT event_id, {columns} FROM usage_events ORDER BY event_id")
        assert writer.load_watermarks([2]) == {2: 40}
    finally:
        writer.close()
    assert rows.result_rows == [
        ("bare", "default", "", "ok", None, {}, 0, 0, 0, 0, 0, "", 1740830400000, 1740830401000, "t1", "p1", 3, 7, 2, 40),
        ("full", "a1", "u", "error", 20, {"k": "v"}, 1200, 7000, 3000, 4000, 0, "openai/gpt-4o@base", 1740830400250,
         1740830401000, "t1", "p1", 3, 7, 2, 40),
    ]  # fmt: skip
