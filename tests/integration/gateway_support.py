"""Helpers for the gateway integration tests: an in-process gateway and a usage.raw reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest_gateway.app import create_app
from spendstream.kafka import client_kwargs
from spendstream.settings import Settings
from spendstream.topics import USAGE_RAW


@asynccontextmanager
async def gateway(settings: Settings, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan (producer, key cache), called through ASGI."""
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gateway", headers=headers, timeout=30
        ) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def raw_position(settings: Settings) -> dict[int, int]:
    """Per partition of usage.raw, an offset at or before its end, to read only what follows.

    The embedded broker's ListOffsets(LATEST) can be too LOW (never too high), so reading from
    here may repeat a few older records: callers filter by their own tenant anyway.
    """
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(USAGE_RAW.name, p) for p in await _partitions(consumer)]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer) -> list[int]:
    deadline = time.monotonic() + 10
    while not (partitions := consumer.partitions_for_topic(USAGE_RAW.name)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{USAGE_RAW.name} has no partitions")
        await consumer.topics()  # refreshes metadata: the topic may have been created just now
    return sorted(partitions)


async def read_raw(
    settings: Settings, tenant: str, events: int, since: dict[int, int] | None = None, timeout: float = 20.0
) -> list[tuple[bytes, dict[str, Any]]]:
    """Records of ``tenant`` on usage.raw until they hold ``events`` events (polling, no sleeps).

    Reads from ``since`` (see raw_position) or the beginning, and filters by key: the topic is
    shared by the whole test session.
    """
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[bytes, dict[str, Any]]] = []
    prefix = f"{tenant}/".encode()
    deadline = time.monotonic() + timeout
    try:
        partitions = [TopicPartition(USAGE_RAW.name, p) for p in await _partitions(consumer)]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, (since or {}).get(tp.partition, 0))
        while sum(len(v["events"]) for _, v in found) < events:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {sum(len(v['events']) for _, v in found)} of {events} events arrived")
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                found += [(r.key, orjson.loads(r.value)) for r in records if r.key.startswith(prefix)]
        return found
    finally:
        await consumer.stop()


def events_by_id(records: list[tuple[bytes, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {ev["event_id"]: ev for _, envelope in records for ev in envelope["events"]}


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
