"""Publishing accepted events to usage.raw: one aiokafka producer, bounded in-flight events."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest_gateway.errors import BrokerUnavailable, Saturated
from ingest_gateway.metrics import GatewayMetrics
from spendstream.contracts import raw_envelope, record_key
from spendstream.kafka import producer_kwargs
from spendstream.settings import Settings
from spendstream.topics import USAGE_RAW, ensure_topics

log = logging.getLogger(__name__)

#: aiokafka refuses records above max_request_size (1 MiB by default, as is Kafka's
#: message.max.bytes); a project's events are split into records below this size.
MAX_RECORD_BYTES = 512 * 1024
_CONNECT_RETRY_S = 1.0
_READY_CACHE_S = 1.0


def encode_records(
    tenant: str, received_at: str, by_project: dict[str, list[dict[str, Any]]], max_bytes: int = MAX_RECORD_BYTES
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records of contract v1: one envelope per project, split if too large."""
    records = []
    for project, events in by_project.items():
        key = record_key(tenant, project)
        pending = [events]
        while pending:
            chunk = pending.pop()
            value = orjson.dumps(raw_envelope(tenant, project, received_at, chunk))
            if len(value) > max_bytes and len(chunk) > 1:
                half = len(chunk) // 2
                pending += [chunk[half:], chunk[:half]]  # popped in order: first half first
            else:
                records.append((key, value))
    return records


class Publisher:
    """Owns the producer. ``publish`` returns only when the broker acknowledged every record."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics):
        self._settings = settings
        self._metrics = metrics
        self._topic = USAGE_RAW.name
        self._timeout_s = settings.kafka.send_timeout_s
        self._max_in_flight = settings.gateway.max_in_flight_events
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._ready_at = 0.0
        self._ready = False
        self.in_flight = 0

    async def start(self) -> None:
        """Connect now if the broker answers; otherwise keep trying in the background."""
        if not await self._try_connect():
            self._connector = asyncio.create_task(self._connect_forever(), name="gateway-producer-connect")

    async def _connect_forever(self) -> None:
        while not await self._try_connect():
            await asyncio.sleep(_CONNECT_RETRY_S)

    async def _try_connect(self) -> bool:
        try:
            await ensure_topics(self._settings, (USAGE_RAW,))
        except Exception as exc:  # no admin rights or broker down: the producer attempt decides
            log.warning("could not ensure topic %s: %s", self._topic, exc)
        # lz4 shrinks JSON envelopes several times for little CPU (cramjam is a dependency)
        producer = AIOKafkaProducer(**producer_kwargs(self._settings, compression_type="lz4"))
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            log.warning("Kafka producer cannot connect to %s yet: %s", self._settings.kafka_bootstrap, exc)
            await producer.stop()
            return False
        self._producer = producer
        log.info("Kafka producer connected to %s", self._settings.kafka_bootstrap)
        return True

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            try:
                await self._connector
            except asyncio.CancelledError:
                pass
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ready(self) -> bool:
        """Broker reachable: a metadata round trip succeeded within the last second."""
        if self._producer is None:
            return False
        now = time.monotonic()
        if now - self._ready_at >= _READY_CACHE_S:
            try:
                await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 2.0)
                self._ready = True
            except (KafkaError, asyncio.TimeoutError, OSError):
                self._ready = False
            self._ready_at = time.monotonic()
        return self._ready

    async def publish(self, records: list[tuple[bytes, bytes]], n_events: int) -> None:
        """Send and wait for every ack, or raise BrokerUnavailable (503) / Saturated (429)."""
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable(f"not connected to Kafka at {self._settings.kafka_bootstrap}")
        # a request larger than the whole bound still goes through when nothing else is waiting
        if self.in_flight + n_events > self._max_in_flight and self.in_flight:
            raise Saturated(f"{self.in_flight} events are waiting for broker acknowledgement; retry shortly")
        self.in_flight += n_events
        self._metrics.in_flight_events.set(self.in_flight)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                acks = [await producer.send(self._topic, value, key=key) for key, value in records]
                await asyncio.gather(*acks)
        except TimeoutError:
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout_s}s") from None
        except KafkaError as exc:
            raise BrokerUnavailable(f"Kafka refused the write: {exc}") from None
        finally:
            self.in_flight -= n_events
            self._metrics.in_flight_events.set(self.in_flight)
        self._metrics.publish_latency.observe(time.perf_counter() - started)
