"""The broker under test (embedded Tansu by default) through aiokafka: the guarantees the
services rely on. End offsets come from fetch high watermarks, never ``end_offsets()``
(Tansu's ListOffsets(LATEST) is wrong for multi-record batches)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.kafka import client_kwargs, consumer_kwargs, producer_kwargs
from spendstream.ports import free_port
from spendstream.settings import Settings
from spendstream.topics import ALL_TOPICS, ensure_topics

pytestmark = pytest.mark.kafka

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(with_clickhouse=False)


async def create_topic(settings: Settings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, settings.kafka.replication_factor)])
    finally:
        await admin.close()


async def produce(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Send every record with acks=all; return value -> partition as acknowledged by the broker."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        sent = [(value, await producer.send(topic, value=value, key=key)) for key, value in records]
        return {value: (await fut).partition for value, fut in sent}
    finally:
        await producer.stop()


async def wait_assigned(*consumers: AIOKafkaConsumer, partitions: int, timeout: float = 15.0) -> None:
    """Poll until the members together own every partition, each at least one, none twice."""
    async with asyncio.timeout(timeout):
        while True:
            owned = [c.assignment() for c in consumers]
            union = set().union(*owned)
            if len(union) == partitions and sum(map(len, owned)) == partitions and all(owned):
                return
            # a member must keep polling to take part in the rebalance
            await asyncio.gather(*(c.getmany(timeout_ms=100) for c in consumers))


async def consume(consumer: AIOKafkaConsumer, count: int, timeout: float = 15.0) -> list[ConsumerRecord]:
    """Read ``count`` records, then check the fetch high watermarks say nothing else is there."""
    records: list[ConsumerRecord] = []
    async with asyncio.timeout(timeout):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            assert await consumer.position(tp) == highwater, f"unread records left on {tp}"
    return records


def make_consumer(settings: Settings, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(topic, **consumer_kwargs(settings, group))


async def test_produce_consume_acks_all_keeps_per_key_order(settings, unique_name):
    topic = unique_name("produce")
    await create_topic(settings, topic, partitions=3)
    records = [(f"tenant/p{i % 7}".encode(), json.dumps({"key": i % 7, "seq": i}).encode()) for i in range(300)]
    acked = await produce(settings, topic, records)

    consumer = make_consumer(settings, topic, unique_name("g"))
    await consumer.start()
    try:
        got = await consume(consumer, len(records))
    finally:
        await consumer.stop()

    assert sorted(r.value for r in got) == sorted(v for _, v in records)
    assert all(acked[r.value] == r.partition for r in got)
    partition_of_key: dict[bytes, set[int]] = defaultdict(set)
    seqs_of_key: dict[bytes, list[int]] = defaultdict(list)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        partition_of_key[r.key].add(r.partition)
        seqs_of_key[r.key].append(json.loads(r.value)["seq"])
    assert all(len(p) == 1 for p in partition_of_key.values()), "a key moved between partitions"
    assert all(seqs == sorted(seqs) for seqs in seqs_of_key.values()), "per-key order broken"


async def test_two_group_members_split_the_partitions(settings, unique_name):
    topic, group = unique_name("split"), unique_name("g")
    await create_topic(settings, topic, partitions=4)
    first, second = make_consumer(settings, topic, group), make_consumer(settings, topic, group)
    await first.start()
    await second.start()
    try:
        await wait_assigned(first, second, partitions=4)
        values = [str(i).encode() for i in range(200)]
        await produce(settings, topic, [(b"k%d" % i, v) for i, v in enumerate(values)])
        got_first, got_second = [], []
        async with asyncio.timeout(15):
            while len(got_first) + len(got_second) < len(values):
                for consumer, got in ((first, got_first), (second, got_second)):
                    for batch in (await consumer.getmany(timeout_ms=100)).values():
                        got.extend(batch)
    finally:
        await asyncio.gather(first.stop(), second.stop())

    assert got_first and got_second, "one member received nothing"
    assert {r.partition for r in got_first}.isdisjoint({r.partition for r in got_second})
    assert sorted(r.value for r in got_first + got_second) == sorted(values)


async def test_committed_offsets_resume_after_close(settings, unique_name):
    topic, group = unique_name("resume"), unique_name("g")
    await create_topic(settings, topic, partitions=2)
    values = [str(i).encode() for i in range(100)]
    await produce(settings, topic, [(b"k%d" % (i % 5), v) for i, v in enumerate(values)])

    reader = make_consumer(settings, topic, group)
    await reader.start()
    try:
        everything = await consume(reader, len(values))
        # "process" only the first 30 records of each partition and commit just those
        processed = [r for r in everything if r.offset < 30]
        await reader.commit({TopicPartition(topic, p): 30 for p in (0, 1)})
    finally:
        await reader.stop()

    resumed = make_consumer(settings, topic, group)
    await resumed.start()
    try:
        rest = await consume(resumed, len(values) - len(processed))
    finally:
        await resumed.stop()
    assert min(r.offset for r in rest) == 30
    assert sorted(r.value for r in processed + rest) == sorted(values)


async def test_committed_offsets_survive_kill9_of_a_member(settings, unique_name):
    topic, group = unique_name("kill9"), unique_name("g")
    await create_topic(settings, topic, partitions=2)
    values = [str(i).encode() for i in range(120)]
    await produce(settings, topic, [(b"k%d" % (i % 4), v) for i, v in enumerate(values)])

    child = subprocess.Popen(
        [
            sys.executable,
            str(WORKERS / "committing_consumer.py"),
            settings.kafka_bootstrap,
            settings.kafka.profile,
            topic,
            group,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    committed: dict[int, int] = {}
    try:
        for batch_no in range(3):
            report = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            assert report, f"consumer child exited with {child.poll()}"
            committed.update({int(p): o for p, o in json.loads(report)["committed"].items()})
            if batch_no < 2:
                child.stdin.write("next\n")
                child.stdin.flush()
        # the child is parked between batches with everything it read committed: kill it hard
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    consumed_by_child = sum(committed.values())
    assert 0 < consumed_by_child < len(values)

    # the survivor must wait out the dead member's session, then resume at the committed offsets
    survivor = make_consumer(settings, topic, group)
    await survivor.start()
    try:
        rest = await consume(survivor, len(values) - consumed_by_child, timeout=30)
        first_offsets = {p: min(r.offset for r in rest if r.partition == p) for p in {r.partition for r in rest}}
    finally:
        await survivor.stop()
    assert all(first_offsets[p] == committed.get(p, 0) for p in first_offsets)
    assert len(rest) == len(values) - consumed_by_child


async def test_ensure_topics_creates_every_topic_once(make_settings, unique_name):
    prefix = unique_name("ensure")
    specs = tuple(dataclasses.replace(spec, name=f"{prefix}.{spec.name}") for spec in ALL_TOPICS)
    settings = make_settings(with_clickhouse=False, kafka={"partitions": 3})

    assert sorted(await ensure_topics(settings, specs)) == sorted(s.name for s in specs)
    assert await ensure_topics(settings, specs) == []

    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in specs])}
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs])
    finally:
        await admin.close()
    assert {name: len(t["partitions"]) for name, t in described.items()} == {s.name: 3 for s in specs}
    cleanup = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}.get("cleanup.policy", "delete")
        for response in configs
        for resource in response.resources
    }
    assert cleanup == {s.name: "compact" if s.compacted else "delete" for s in specs}
    assert any(s.compacted for s in specs) and not all(s.compacted for s in specs)


async def test_restart_keeps_the_port_and_loses_the_data(tmp_path):
    # a broker of its own: restarting the session broker would wipe other tests' topics
    with EmbeddedKafka(log_path=tmp_path / "tansu.log") as broker:
        settings = Settings(kafka={"bootstrap_servers": broker.bootstrap, "profile": "embedded"})
        await create_topic(settings, "before-restart", partitions=1)
        port = broker.port
        broker.restart()
        assert broker.port == port and broker.running()
        admin = AIOKafkaAdminClient(**client_kwargs(settings))
        await admin.start()
        try:
            assert "before-restart" not in await admin.list_topics()
        finally:
            await admin.close()
        broker.kill()
        assert not broker.running()
    assert "ready in" in (tmp_path / "tansu.log").read_text()


async def test_cli_runs_the_broker_until_sigterm(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendstream.cli", "embedded-kafka", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "SPENDSTREAM_DATA_DIR": str(tmp_path)},
    )
    try:
        banner = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert f"127.0.0.1:{port}" in banner, banner
        settings = Settings(kafka={"bootstrap_servers": f"127.0.0.1:{port}", "profile": "embedded"})
        await create_topic(settings, "cli-check", partitions=1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
