"""The pricing stage as `spendstream processors --stages pricing` on a real broker and ClickHouse.

- client retries (the same event ids in later records, and twice in one record) come out priced
  exactly once; garbage goes to the DLQ and the stage keeps going;
- SIGKILL mid-stream and right after the last output (before its offsets were committed): the
  replayed records are byte-identical to the first copies, and after the downstream src-watermark
  filter every event id is there exactly once; the dedupe state survives the restarts;
- tenant overrides written to ClickHouse apply without a restart; a ClickHouse outage keeps the
  last set.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from stage_support import (
    FAST_BATCHING,
    StageWorker,
    committed_offsets,
    log_ends,
    make_event,
    migrate,
    produce,
    raw_record,
    read_topic,
    stage_settings,  # noqa: F401 - fixture
    wait_committed,
)

from spendstream.clickhouse import get_client
from spendstream.embedded.clickhouse import EmbeddedClickHouse
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.topics import USAGE_DLQ, USAGE_PRICED, USAGE_RAW

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "acme"
GROUP = "spendstream-pricing"


def priced_event_ids(records) -> list[str]:
    return [e["event_id"] for r in records for e in orjson.loads(r.value)["events"]]


def first_copies(records) -> list:
    """What a downstream stage applies (the sink's src watermark): per src partition, only records
    whose src offset is above every one seen before (``records`` in log order per partition)."""
    high: dict[int, int] = {}
    kept = []
    for r in records:
        partition, offset = src_of(r)
        if offset > high.get(partition, -1):
            high[partition] = offset
            kept.append(r)
    return kept


async def test_client_retries_are_priced_once_and_garbage_is_dead_lettered(stage_settings, tmp_path):
    s = stage_settings
    rng = random.Random(7)
    records, sent = [], []
    n_good = 0
    for i in range(240):
        project = f"proj-{i % 6}"
        events = [make_event(f"{project}-{i}-{j}", project, i * 5 + j) for j in range(5)]
        if i % 5 == 4 and sent:  # a client retry: an earlier request of the same project again
            events = rng.choice([e for e in sent if e[0]["project"] == project] or [events])
        elif i % 7 == 0:
            events = events + [events[0]]  # the same event twice in one request
        sent.append(events)
        records.append(raw_record(TENANT, project, events))
        n_good += 1
        if i % 60 == 30:
            records.append((b"acme/proj-0", b"\x00not json"))
            records.append((b"acme/proj-1", orjson.dumps({"v": 1, "tenant": TENANT, "events": []})))
    unknown = make_event("mystery-1", "proj-0", 1, provider="acme-ai", model="secret-model")
    records.append(raw_record(TENANT, "proj-0", [unknown]))
    n_good += 1
    expected_ids = {e["event_id"] for events in sent for e in events} | {"mystery-1"}
    await produce(s, USAGE_RAW.name, records)

    worker = StageWorker(s, "pricing", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        priced = await read_topic(s, USAGE_PRICED.name, lambda rs: len(rs) >= n_good, what="one per raw record")
        dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 8, what="garbage dead-lettered")
        assert worker.alive()
        metrics = worker.metrics()
    finally:
        worker.stop()

    srcs = [orjson.loads(r.value)["src"] for r in priced]
    assert len({(x["partition"], x["offset"]) for x in srcs}) == len(priced) == n_good
    ids = priced_event_ids(priced)
    assert Counter(ids).most_common(1)[0][1] == 1
    assert set(ids) == expected_ids
    reasons = sorted(orjson.loads(r.value)["reason"].split(":")[0] for r in dlq)
    assert reasons == ["missing or invalid project"] * 4 + ["not JSON"] * 4
    assert metrics["spendstream_pricing_unknown_model_events_total"] == 1
    repeats = sum(len(e) for e in sent) - (len(expected_ids) - 1)  # mystery-1 was sent once, outside ``sent``
    assert metrics['spendstream_pricing_events_total{outcome="duplicate"}'] == repeats


async def test_sigkill_mid_stream_and_before_commit(stage_settings, tmp_path):
    s = stage_settings
    rng = random.Random(11)
    all_ids: list[str] = []

    def batch(name: str, n_records: int) -> list[tuple[bytes, bytes]]:
        out = []
        for i in range(n_records):
            project = f"proj-{i % 8}"
            events = [make_event(f"{project}-{name}{i}-{j}", project, i * 8 + j) for j in range(8)]
            all_ids.extend(e["event_id"] for e in events)
            out.append(raw_record(TENANT, project, events))
        return out

    await produce(s, USAGE_RAW.name, batch("a", 1500))
    worker = StageWorker(s, "pricing", tmp_path)
    try:
        # 1. a kill at a random point while the stage works through the backlog
        await asyncio.to_thread(worker.wait_healthy)
        await read_topic(s, USAGE_PRICED.name, lambda rs: len(rs) >= 100, what="first output")
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        worker.kill()
        # 2. a kill right after the last output, before its offsets are committed (Faust commits
        #    on the next message or after its commit interval): the tail must be replayed
        for attempt in range(5):
            worker.restart()
            await asyncio.to_thread(worker.wait_healthy)
            raw_ends = log_ends(await read_topic(s, USAGE_RAW.name, lambda rs, n=1500 + 20 * attempt: len(rs) >= n))
            await read_topic(
                s, USAGE_PRICED.name, lambda rs, ends=raw_ends: covers(rs, ends), what="every raw record priced"
            )
            worker.kill()
            committed = await committed_offsets(s, GROUP, USAGE_RAW.name)
            if any((committed[p] or 0) < end for p, end in raw_ends.items()):
                break
            # the tail got committed before the kill: give the stage more input and try again
            await produce(s, USAGE_RAW.name, batch(f"r{attempt}x", 20))
        else:
            raise AssertionError("could not kill the stage between its output and its commit")
        worker.restart()
        await asyncio.to_thread(worker.wait_healthy)
        await wait_committed(s, GROUP, USAGE_RAW.name, raw_ends)
        # 3. the dedupe state survived: retries of first-run ids are dropped, new ids priced
        retried = [make_event(i, i.rsplit("-", 2)[0], 0) for i in rng.sample(all_ids, 50)]
        fresh = [make_event(f"fresh-{j}", "proj-0", j) for j in range(5)]
        await produce(s, USAGE_RAW.name, [raw_record(TENANT, e["project"], [e]) for e in retried + fresh])
        n_raw = sum(raw_ends.values()) + len(retried) + len(fresh)
        priced = await read_topic(
            s, USAGE_PRICED.name, lambda rs: len({src_of(r) for r in rs}) >= n_raw, what="retries and fresh priced"
        )
    finally:
        worker.stop()

    copies: dict[tuple[int, int], set[bytes]] = defaultdict(set)
    count: Counter = Counter()
    for r in priced:
        copies[src_of(r)].add(r.value)
        count[src_of(r)] += 1
    assert all(len(values) == 1 for values in copies.values()), "a replayed record differs from its first copy"
    assert max(count.values()) >= 2, "no record was replayed"
    applied = priced_event_ids(first_copies(priced))
    assert Counter(applied).most_common(1)[0][1] == 1
    assert sorted(applied) == sorted(all_ids + [e["event_id"] for e in fresh])


def src_of(record) -> tuple[int, int]:
    src = orjson.loads(record.value)["src"]
    return src["partition"], src["offset"]


def covers(records, ends: dict[int, int]) -> bool:
    seen = {src_of(r) for r in records}
    return all((p, o) in seen for p, end in ends.items() for o in range(end))


async def metric_reaches(worker: StageWorker, name: str, value: float, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while worker.metrics().get(name, 0) < value:
        assert loop.time() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


def write_override(settings, version: int, deleted: int) -> None:
    client = get_client(settings)
    try:
        client.insert(
            "price_overrides",
            [[TENANT, "ovr-1", "openai", "gpt-4o", datetime(2025, 1, 1, tzinfo=UTC), Decimal("1"),
              Decimal("2"), version, deleted]],
            column_names=["tenant", "id", "provider", "model", "effective_from", "input_mtok", "output_mtok",
                          "version", "deleted"],
        )  # fmt: skip
    finally:
        client.close()


async def test_overrides_apply_without_restart_and_survive_a_clickhouse_outage(make_settings, tmp_path):
    clickhouse = EmbeddedClickHouse(path=str(tmp_path / "chdb")).start()
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    s = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap}, clickhouse={"url": clickhouse.url},
        **FAST_BATCHING, pricing={"overrides_reload_s": 0.2},
    )  # fmt: skip
    migrate(s)
    worker = StageWorker(s, "pricing", tmp_path)
    sent = 0

    async def price_one(name: str) -> dict:
        nonlocal sent
        await produce(s, USAGE_RAW.name, [raw_record(TENANT, "proj-0", [make_event(name, "proj-0", sent)])])
        sent += 1
        out = await read_topic(s, USAGE_PRICED.name, lambda rs: len(rs) >= sent)  # one partition: in order
        return orjson.loads(out[-1].value)["events"][0]

    async def price_until_override(prefix: str) -> dict:
        for attempt in range(50):
            priced = await price_one(f"{prefix}-{attempt}")
            if priced["price_source"] == "override":
                return priced
        raise AssertionError("the override never applied")

    try:
        await asyncio.to_thread(worker.wait_healthy)
        assert (await price_one("before"))["price_source"] == "catalog"
        # a deleted override must not apply; its next version (deleted=0) does, without a restart
        await asyncio.to_thread(write_override, s, 1, 1)
        await metric_reaches(worker, "spendstream_pricing_overrides_loaded_timestamp_seconds", time.time())
        assert (await price_one("deleted"))["price_source"] == "catalog"
        await asyncio.to_thread(write_override, s, 2, 0)
        priced = await price_until_override("after")
        assert (priced["price_id"], priced["cost_nanos"]) == (
            "override:ovr-1",
            priced["input_tokens"] * 1000 + priced["output_tokens"] * 2000,
        )
        # ClickHouse down: the stage keeps pricing with the last overrides it read
        await asyncio.to_thread(clickhouse.stop)
        await metric_reaches(worker, "spendstream_pricing_overrides_reload_failures_total", 1)
        assert (await price_one("outage"))["price_source"] == "override"
        assert worker.alive()
    finally:
        worker.stop()
        broker.stop()
        clickhouse.stop()


async def test_a_raw_record_at_the_gateway_size_limit_is_priced(stage_settings, tmp_path):
    """The gateway cuts raw records at 512 KiB; pricing adds a cost breakdown to every event, so
    the priced record is larger than Kafka's 1 MiB default request limit uncompressed."""
    s = stage_settings
    small = {"agent": "a", "provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 1}
    events = [{"event_id": f"big-{i}", "timestamp": "2025-06-01T10:00:00.000Z", "project": "proj-0", **small}
              for i in range(3_100)]  # fmt: skip
    key, value = raw_record(TENANT, "proj-0", events)
    assert 480 * 1024 < len(value) <= 512 * 1024
    await produce(s, USAGE_RAW.name, [(key, value), raw_record(TENANT, "proj-0", [make_event("after", "proj-0", 1)])])
    worker = StageWorker(s, "pricing", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        priced = await read_topic(s, USAGE_PRICED.name, lambda rs: len(rs) >= 2, what="both records priced")
    finally:
        worker.stop()
    assert len(priced[0].value) > 1024 * 1024
    assert priced_event_ids(priced) == [e["event_id"] for e in events] + ["after"]
