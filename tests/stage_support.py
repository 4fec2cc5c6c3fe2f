"""Test support for the stream stages (pytest puts tests/ on sys.path: ``import stage_support``).

- ``StageWorker``: ``spendstream processors --stages <stage>`` as a child process, exactly as
  ``spendstream dev`` runs it, with health, metrics, SIGKILL and restart.
- Topic IO: produce raw envelopes, read a topic until a condition holds (never ``end_offsets()``:
  the embedded broker's ListOffsets is wrong, see shared/EMBEDDED-STACK.md).
- ClickHouse: migrate a test database, and the totals of ``usage_events`` and of every MV.

The stage topics have fixed names, so every test that runs stages starts a broker of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from spendstream.aggregates import AGGREGATES
from spendstream.contracts import raw_envelope, record_key
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.kafka import client_kwargs, producer_kwargs
from spendstream.settings import Settings, settings_env
from spendstream.topics import ensure_topics

#: fast batching for tests (the defaults favour throughput): ``make_settings(**FAST_BATCHING)``
FAST_BATCHING = {"processors": {"batch_max_seconds": 0.05}, "sink": {"batch_seconds": 0.2}}


class StageWorker:
    """One stage worker process; ``restart()`` starts a new process with the same settings."""

    def __init__(self, settings: Settings, stage: str, log_dir: Path, extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.stage = stage
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.url = f"http://127.0.0.1:{settings.processors.web_port}"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._spawn()

    def _spawn(self) -> None:
        self.starts += 1
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log_path = self.log_dir / f"{self.stage}-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spendstream.cli", "processors", "--stages", self.stage],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.log_path = log_path

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.alive(), f"{self.stage} worker exited ({self.proc.returncode}):\n{self.log_tail()}"
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.stage} worker not healthy after {timeout}s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by ``name{labels}``."""
        text = httpx.get(self.url + "/metrics", timeout=2.0).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def kill(self) -> None:
        """SIGKILL the worker (its whole process group)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self._spawn()

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------- Kafka


def make_event(event_id: str, project: str, i: int, **extra: Any) -> dict[str, Any]:
    """A normalised event as the gateway writes it; token counts vary with ``i``."""
    ev = {
        "event_id": event_id,
        "timestamp": f"2025-06-01T10:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "project": project,
        "agent": f"agent-{i % 3}",
        "user": f"user-{i % 7}",
        "tags": {"team": f"team-{i % 2}"},
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1000 + i % 97,
        "output_tokens": 100 + i % 13,
        "cache_read_tokens": i % 50,
        "latency_ms": 200 + i % 11,
        "status": "error" if i % 17 == 0 else "ok",
    }
    ev.update(extra)
    return ev


def raw_record(tenant: str, project: str, events: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    return record_key(tenant, project), orjson.dumps(raw_envelope(tenant, project, "2025-06-01T10:00:00.000Z", events))


async def produce(
    settings: Settings,
    topic: str,
    records: Iterable[
        tuple[bytes | None, bytes] | tuple[bytes | None, bytes, int] | tuple[bytes | None, bytes, int, list]
    ],
) -> None:
    """Send (key, value) records (partition by key), (key, value, partition) or (key, value,
    partition, headers); wait for all acks."""
    await ensure_topics(settings)
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, r[1], key=r[0], partition=r[2] if len(r) > 2 else None, headers=r[3] if len(r) > 3 else None
            )
            for r in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(
    settings: Settings,
    topic: str,
    done: Callable[[list[ConsumerRecord]], bool],
    timeout: float = 60.0,
    what: str = "",
) -> list[ConsumerRecord]:
    """Every record of ``topic`` in log order per partition, read until ``done(records)`` holds."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, group_id=None)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        while not done(records):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{topic}: {what or 'condition'} not reached in {timeout}s ({len(records)} records)"
                )
            batch = await consumer.getmany(timeout_ms=200)
            for tp_records in batch.values():
                records.extend(tp_records)
        return records
    finally:
        await consumer.stop()


# ---------------------------------------------------------------- ClickHouse


def migrate(settings: Settings) -> None:
    from spendstream.migrate import main as migrate_main

    assert migrate_main(settings) == 0


MEASURES = (
    "calls", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cost_nanos",
    "cost_input_nanos", "cost_output_nanos", "cost_cache_read_nanos", "latency_ms_sum",
)  # fmt: skip
#: the aggregates that count every event once: their sums equal usage_events'
AGG_TABLES = tuple(a.table for a in AGGREGATES if a.counts_every_event and set(MEASURES) <= a.measure_names)
#: the aggregates with one row per tag of each event
TAGGED_TABLES = tuple(a.table for a in AGGREGATES if a.tagged and {"calls", "cost_nanos"} <= a.measure_names)
#: the same measures computed from usage_events
RAW_MEASURES = (
    "count()", "countIf(status = 'error')", "sum(input_tokens)", "sum(output_tokens)", "sum(cache_read_tokens)",
    "sum(cost_nanos)", "sum(cost_input_nanos)", "sum(cost_output_nanos)", "sum(cost_cache_read_nanos)",
    "sum(ifNull(latency_ms, 0))",
)  # fmt: skip


def stored_totals(settings: Settings) -> dict[str, tuple[int, ...]]:
    """Totals of usage_events and of each aggregate, in MEASURES order (tags: weighted by tag count)."""
    from spendstream.clickhouse import get_client

    client = get_client(settings)
    try:

        def first_row(sql: str) -> tuple:
            return tuple(client.query(sql).result_rows[0])

        out = {"usage_events": first_row(f"SELECT {', '.join(RAW_MEASURES)} FROM usage_events")}
        for table in AGG_TABLES:
            out[table] = first_row(f"SELECT {', '.join(f'sum({m})' for m in MEASURES)} FROM {table}")
        # an event with n tags counts in n rows of a tagged aggregate
        out["tags:usage_events"] = first_row(
            "SELECT sum(length(tags)), sum(length(tags) * cost_nanos) FROM usage_events"
        )
        for table in TAGGED_TABLES:
            out[f"tags:{table}"] = first_row(f"SELECT sum(calls), sum(cost_nanos) FROM {table}")
        out["event_ids"] = first_row("SELECT count(), uniqExact(event_id) FROM usage_events")
        return {k: tuple(int(x or 0) for x in v) for k, v in out.items()}
    finally:
        client.close()


def assert_aggregates_match(totals: dict[str, tuple[int, ...]]) -> None:
    assert AGG_TABLES and TAGGED_TABLES
    for table in AGG_TABLES:
        assert totals[table] == totals["usage_events"], f"{table}: {totals[table]} != {totals['usage_events']}"
    for table in TAGGED_TABLES:
        assert totals[f"tags:{table}"] == totals["tags:usage_events"], table


async def wait_committed(
    settings: Settings, group: str, topic: str, ends: dict[int, int], timeout: float = 60.0
) -> None:
    """Until ``group`` committed every partition of ``topic`` up to ``ends``."""
    deadline = time.monotonic() + timeout
    while True:
        committed = await committed_offsets(settings, group, topic)
        if all((committed[p] or 0) >= end for p, end in ends.items()):
            return
        assert time.monotonic() < deadline, f"{group}: offsets {committed} never reached {ends}"
        await asyncio.sleep(0.2)


async def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(settings.kafka.partitions)}
    finally:
        await consumer.stop()


def log_ends(records: list[ConsumerRecord]) -> dict[int, int]:
    """Next offset per partition after the records read."""
    ends: dict[int, int] = {}
    for r in records:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


@pytest.fixture
def stage_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[Settings]:
    """Settings on a broker of this test's own (the stage topics have fixed names) and a migrated
    ClickHouse database of its own."""
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap}, **FAST_BATCHING)
    migrate(settings)
    try:
        yield settings
    finally:
        broker.stop()
