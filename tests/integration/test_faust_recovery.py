"""Faust on the broker under test, with the embedded profile.

Table restart-recovery: three workers of one app count events per key in a Table, one after the other:
1. the first handles a burst, commits it and is SIGKILLed while idle: the second worker must
   show the exact counts without receiving one event again, i.e. from the changelog alone;
2. the second (slowed down) is SIGKILLed mid-stream after a partial commit: the third must
   recover the table, get the uncommitted events again, skip those already counted and end,
   after more events, with exact counts.

Records Faust drops from a fetched batch (partition paused meanwhile, as recovery and rebalances
do) are fetched again and reach the agent before their offsets are committed
(``stream_processors.runtime.consumer``; stock Faust commits past them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from spendstream.kafka import client_kwargs, consumer_kwargs, producer_kwargs
from spendstream.settings import Settings

pytestmark = pytest.mark.kafka

COUNTER_APP = Path(__file__).parent / "workers" / "faust_counter.py"
PAUSING_APP = Path(__file__).parent / "workers" / "faust_pausing.py"
KEYS = [f"tenant/p{i}" for i in range(12)]
#: events per key sent while each of the three workers runs
BURST_SEQS, MID_STREAM_SEQS, FINAL_SEQS = 30, 40, 10
#: per-event delay of the second worker: its 480 events take ≥ 4.8 s, so the kill lands mid-stream
SLOW_WORKER_DELAY_MS = 10

Snapshot = dict[str, Any]


class FaustWorker:
    """One worker process of a test Faust app (``workers/<script> worker``), in its own process
    group, logging to a file; ``page`` is the app's JSON page the test polls."""

    def __init__(self, script: Path, page: str, settings: Settings, log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{settings.processors.web_port}{page}"
        env = {
            **os.environ,
            "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka_bootstrap,
            "SPENDSTREAM_KAFKA__PROFILE": settings.kafka.profile,
            "SPENDSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
            "SPENDSTREAM_PROCESSORS__WEB_PORT": str(settings.processors.web_port),
            "SPENDSTREAM_DATA_DIR": settings.data_dir,
            **env,
        }
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "worker", "--loglevel", "info"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def snapshot(self, http: httpx.AsyncClient) -> Snapshot | None:
        try:
            response = await http.get(self.url, timeout=2)
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    async def wait_for(self, predicate: Callable[[Snapshot], bool], what: str, timeout: float = 30.0) -> Snapshot:
        last: Snapshot | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient() as http:
            while loop.time() < deadline:
                assert self.proc.poll() is None, f"worker exited ({self.proc.returncode}):\n{self.log_tail()}"
                last = await self.snapshot(http) or last
                if last is not None and predicate(last):
                    return last
                await asyncio.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; last snapshot {last}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the worker's process group: a crash, nothing flushed or committed on the way out."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, n, settings.kafka.replication_factor) for t, n in partitions.items()])
    finally:
        await admin.close()


def exact_counts(seqs: int) -> dict[str, list[int]]:
    return {key: [seqs, seqs] for key in KEYS}


async def send_seqs(settings: Settings, topic: str, first: int, last: int) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        pending = [
            await producer.send(topic, key=key.encode(), value=b'{"seq": %d}' % seq)
            for seq in range(first, last + 1)
            for key in KEYS
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def committed_offsets(
    settings: Settings, group: str, topic: str, partitions: int | None = None
) -> dict[int, int]:
    # a group member that never subscribes only reads the group's offsets; it does not join
    reader = AIOKafkaConsumer(**consumer_kwargs(settings, group))
    await reader.start()
    try:
        partitions = range(partitions or settings.kafka.partitions)
        return {p: await reader.committed(TopicPartition(topic, p)) or 0 for p in partitions}
    finally:
        await reader.stop()


async def committed_total(settings: Settings, group: str, topic: str, worker: FaustWorker) -> int:
    assert worker.proc.poll() is None, f"worker exited:\n{worker.log_tail()}"
    return sum((await committed_offsets(settings, group, topic)).values())


async def test_table_counts_exact_after_worker_sigkill(make_settings, unique_name, tmp_path):
    settings = make_settings(with_clickhouse=False)
    app_id, topic = unique_name("counter"), unique_name("counted")
    await create_topics(settings, {topic: settings.kafka.partitions})

    def start_worker(name: str, delay_ms: int = 0) -> FaustWorker:
        # each worker gets fresh settings, so its own web port and data directory
        env = {"COUNTER_APP_ID": app_id, "COUNTER_TOPIC": topic, "COUNTER_DELAY_MS": str(delay_ms)}
        worker = FaustWorker(
            COUNTER_APP, "/counts/", make_settings(with_clickhouse=False), tmp_path / f"{name}.log", env
        )
        workers.append(worker)
        return worker

    workers: list[FaustWorker] = []
    try:
        # 1. burst, committed, kill -9 while idle
        first = start_worker("first")
        burst = len(KEYS) * BURST_SEQS
        await send_seqs(settings, topic, 1, BURST_SEQS)
        await first.wait_for(lambda s: s["counts"] == exact_counts(BURST_SEQS), "the burst to be counted")
        async with asyncio.timeout(30):
            while await committed_total(settings, app_id, topic, first) < burst:
                await asyncio.sleep(0.2)
        first.kill()

        second = start_worker("second", delay_ms=SLOW_WORKER_DELAY_MS)
        restored = await second.wait_for(lambda s: s["ready"], "the second worker to recover", timeout=40)
        assert restored["handled"] == 0
        assert restored["counts"] == exact_counts(BURST_SEQS), "changelog recovery lost updates"

        # 2. kill -9 mid-stream, after part of the new events is committed
        await send_seqs(settings, topic, BURST_SEQS + 1, BURST_SEQS + MID_STREAM_SEQS)
        mid_stream = len(KEYS) * MID_STREAM_SEQS
        async with asyncio.timeout(30):
            while await committed_total(settings, app_id, topic, second) < burst + mid_stream // 4:
                await asyncio.sleep(0.2)
        in_flight = await second.wait_for(lambda s: True, "a snapshot before the kill")
        assert in_flight["handled"] < mid_stream, "worker finished before the kill; raise SLOW_WORKER_DELAY_MS"
        second.kill()
        committed_by_partition = await committed_offsets(settings, app_id, topic)
        assert burst < sum(committed_by_partition.values()) < burst + mid_stream

        third = start_worker("third")
        await third.wait_for(
            lambda s: s["counts"] == exact_counts(BURST_SEQS + MID_STREAM_SEQS), "the third worker to catch up", 40
        )
        last_seq = BURST_SEQS + MID_STREAM_SEQS + FINAL_SEQS
        await send_seqs(settings, topic, BURST_SEQS + MID_STREAM_SEQS + 1, last_seq)
        final = await third.wait_for(lambda s: s["counts"] == exact_counts(last_seq), "the final counts")
        # Events before the committed offsets were not delivered again: their share of the exact
        # final counts came from the changelog. (The offsets read after the kill are a lower
        # bound: a commit sent just before it may land after the read.)
        first_offsets = {int(p): offset for p, offset in final["first_offsets"].items()}
        assert all(first_offsets[p] >= committed_by_partition[p] for p in first_offsets)
        assert sum(count for count, _ in final["recovered"].values()) >= sum(committed_by_partition.values())
    finally:
        for worker in workers:
            worker.kill()


async def test_records_dropped_from_a_fetched_batch_reach_the_agent_before_their_commit(
    make_settings, unique_name, tmp_path
):
    settings = make_settings(with_clickhouse=False)
    app_id, topic = unique_name("pausing"), unique_name("paused")
    await create_topics(settings, {topic: 1})
    # one fetched batch for the pause to cut, then records after the dropped ones: stock Faust
    # counts the jump to those as done (commits past the dropped records)
    first_wave, second_wave, pause_at = 3_000, 100, 10
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, b"%d" % i) for i in range(first_wave)])
        env = {"PAUSING_APP_ID": app_id, "PAUSING_TOPIC": topic, "PAUSING_AT": str(pause_at)}
        worker = FaustWorker(PAUSING_APP, "/seen/", settings, tmp_path / "pausing.log", env)
        try:
            await worker.wait_for(lambda s: pause_at in s["seen"], "the agent to pause")
            await asyncio.gather(*[await producer.send(topic, b"%d" % i) for i in range(second_wave)])
            n_records = first_wave + second_wave
            async with asyncio.timeout(60):
                while (await committed_offsets(settings, app_id, topic, partitions=1))[0] < n_records:
                    assert worker.proc.poll() is None, f"worker exited:\n{worker.log_tail()}"
                    await asyncio.sleep(0.2)
            # what the agent had received when everything was committed
            seen = (await worker.wait_for(lambda s: True, "the offsets seen"))["seen"]
        finally:
            worker.kill()
    finally:
        await producer.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "seeking back" in log, "the pause dropped no fetched record: the test did not drive the condition"
    missing = sorted(set(range(n_records)) - set(seen))
    assert not missing, f"committed {n_records} but {len(missing)} offsets never reached the agent: {missing[:20]}..."


EARLY_FETCH_APP = Path(__file__).parent / "workers" / "faust_early_fetch.py"


async def test_a_restarted_worker_hands_its_agent_every_record_from_the_committed_offset_in_order(
    make_settings, unique_name, tmp_path
):
    """With a table to recover, Faust resumes a stream partition with flow on before seeking it to
    its committed offset: a fetcher standing elsewhere meanwhile must not hand the agent records
    out of order, and records fetched while the consumer holds them back (the whole backlog, with
    nothing after it) are fetched again."""
    settings = make_settings(with_clickhouse=False)
    app_id, topic = unique_name("earlyfetch"), unique_name("fetched")
    await create_topics(settings, {topic: 1, f"{app_id}-marks-changelog": 1})
    n_records, committed = 2_000, 500
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, b"%d" % i) for i in range(n_records)])
        await producer.send_and_wait(f"{app_id}-marks-changelog", b'"recovered"', key=b'"state"')
    finally:
        await producer.stop()
    # the group's position, as a worker that processed the first records would have left it
    committer = AIOKafkaConsumer(**consumer_kwargs(settings, app_id))
    await committer.start()
    try:
        committer.assign([TopicPartition(topic, 0)])
        await committer.commit({TopicPartition(topic, 0): committed})
    finally:
        await committer.stop()
    assert (await committed_offsets(settings, app_id, topic, partitions=1))[0] == committed

    env = {"EARLY_FETCH_APP_ID": app_id, "EARLY_FETCH_TOPIC": topic, "EARLY_FETCH_COMMITTED": str(committed)}
    worker = FaustWorker(EARLY_FETCH_APP, "/seen/", settings, tmp_path / "early_fetch.log", env)
    try:
        seen = (await worker.wait_for(lambda s: n_records - 1 in s["seen"], "the last record", timeout=60))["seen"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (final := (await committed_offsets(settings, app_id, topic, partitions=1))[0]) < n_records:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.log_tail()}"
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
        snapshot = await worker.wait_for(lambda s: True, "the table")
    finally:
        worker.kill()
    assert list(snapshot["marks"].values()) == ["recovered"], "no table recovery: the test took another path"
    assert seen[0] == committed, f"the agent started at offset {seen[0]}, the group had committed {committed}"
    jumps = [(a, b) for a, b in zip(seen, seen[1:]) if b != a + 1]
    assert not jumps, f"the agent's offsets jump: {jumps[:10]} (records skipped, handed out later or never)"
    assert final == n_records, (
        f"committed {final} of {n_records} (agent saw {len(snapshot['seen'])} records)\n{worker.log_tail()}"
    )
