"""Publishing accepted events to usage.raw: one aiokafka producer, bounded in-flight events.

Requests that arrive in the same event-loop turn are coalesced: their events for one
``tenant/project`` go out in one envelope record (the value format of contracts.py is unchanged;
an envelope simply holds the events of several requests). Per-record overhead in aiokafka and the
broker is what limits single-event posts, so this multiplies their throughput. Every request still
waits until each record holding its events is acknowledged (acks=all) before it is answered.

Records are produced only while the topic is known to exist on the broker ("usable"). The
embedded broker keeps topics in memory only and, after a restart, acknowledges records sent to the
topic that no longer exists without storing them anywhere a consumer can read (measured: offsets
0, 1, 2 acked, no topic in the metadata, nothing fetched). So a lost connection makes the publisher
unusable at once and fails every request still waiting for acks (503); a keeper task checks the
topic in the broker's metadata every ``_CHECK_S`` (recreating it when missing) and makes the
publisher usable again. The periodic metadata request also keeps the producer's connection open,
so a restart while idle breaks a connection too instead of going unnoticed.

Events waiting for acks are bounded twice (``InFlight``): in all, and per tenant to a share of
that bound, so one tenant sending faster than the broker acknowledges gets its 429s while the
others' requests still find room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.conn import CloseReason
from aiokafka.errors import KafkaError

from ingest_gateway.errors import BrokerUnavailable, Saturated
from ingest_gateway.logic import encode
from ingest_gateway.metrics import GatewayMetrics
from spendstream.contracts import raw_envelope, record_key
from spendstream.kafka import producer_kwargs
from spendstream.settings import Settings
from spendstream.topics import USAGE_RAW, ensure_topics

log = logging.getLogger(__name__)

#: a project's events are split into records below this size. aiokafka refuses records above
#: max_request_size and Kafka above message.max.bytes (1 MiB by default each), and the pricing
#: stage's record for a raw record is up to ~2.7x larger (stream_processors/runtime/producer.py).
MAX_RECORD_BYTES = 256 * 1024
#: snappy shrinks the JSON envelopes ~3x at a few % of the gateway's CPU; aiokafka's lz4 runs at
#: level 9 and cost a fifth of the CPU in batch benchmarks (cramjam provides both codecs)
COMPRESSION = "snappy"
#: how often the keeper checks that the broker answers and the topic exists
_CHECK_S = 0.5
_METADATA_TIMEOUT_S = 2.0
#: how long a request waits for an unusable broker before its 503: long enough to ride out a
#: restart of the embedded broker (the keeper sees it back within _CHECK_S), short enough that
#: clients of a broker that is really down are told so soon
_USABLE_WAIT_S = 1.0


def encode_events(events: Sequence[Any], max_bytes: int = MAX_RECORD_BYTES) -> list[bytes]:
    """The events as comma-separated JSON, in parts of at most ``max_bytes`` (one larger event is a part)."""
    value = encode(events)[1:-1]
    if len(value) <= max_bytes or len(events) == 1:
        return [value]
    # one spare part because events differ in size; a part still too large splits again
    parts = -(-len(value) // max_bytes) + 1
    step = -(-len(events) // parts)
    return [
        part for start in range(0, len(events), step) for part in encode_events(events[start : start + step], max_bytes)
    ]


def encode_records(
    tenant: str, project: str, received_at: str, parts: Sequence[bytes], max_bytes: int = MAX_RECORD_BYTES
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` envelope records of contract v1 for one project holding the encoded ``parts``
    in order, each record at most ``max_bytes`` unless a single part is larger."""
    key = record_key(tenant, project)
    empty = encode(raw_envelope(tenant, project, received_at, []))
    assert empty.endswith(b"[]}"), "the events must be the envelope's last field"
    head, tail = empty[:-2], b"]}"
    room = max_bytes - len(empty)
    records: list[tuple[bytes, bytes]] = []
    current: list[bytes] = []
    size = 0
    for part in parts:
        if current and size + len(part) > room:
            records.append((key, head + b",".join(current) + tail))
            current, size = [], 0
        current.append(part)
        size += len(part) + 1
    if current:
        records.append((key, head + b",".join(current) + tail))
    return records


class InFlight:
    """Counts events waiting for broker acks, in all and per tenant, and admits a request only
    within both bounds. A request larger than a bound still goes through when nothing counted
    against that bound is waiting, so no request size is refused for ever."""

    def __init__(self, max_events: int, tenant_share: float):
        self.max_events = max_events
        self.max_tenant_events = max(1, int(max_events * tenant_share))
        self.events = 0
        self._by_tenant: dict[str, int] = {}

    def admit(self, tenant: str, n_events: int) -> None:
        """Count ``n_events`` of ``tenant`` as waiting, or raise Saturated (429)."""
        held = self._by_tenant.get(tenant, 0)
        if self.events and self.events + n_events > self.max_events:
            raise Saturated(f"{self.events} events are waiting for broker acknowledgement; retry shortly")
        if held and held + n_events > self.max_tenant_events:
            raise Saturated(
                f"{held} events of this tenant are waiting for broker acknowledgement, its share of the "
                f"gateway is {self.max_tenant_events}; retry shortly"
            )
        self.events += n_events
        self._by_tenant[tenant] = held + n_events

    def release(self, tenant: str, n_events: int) -> None:
        self.events -= n_events
        held = self._by_tenant[tenant] - n_events
        if held:
            self._by_tenant[tenant] = held
        else:
            del self._by_tenant[tenant]  # idle tenants leave no entry behind


class _Ticket:
    """One request waiting for the acks of every record that holds any of its events."""

    __slots__ = ("future", "remaining", "deadline")

    def __init__(self, future: asyncio.Future[None], deadline: float):
        self.future = future
        self.remaining = 0
        self.deadline = deadline


class _Batch:
    """Encoded events of one tenant/project gathered during one event-loop turn."""

    __slots__ = ("received_at", "parts", "tickets")

    def __init__(self, received_at: str):
        self.received_at = received_at
        self.parts: list[bytes] = []
        self.tickets: list[_Ticket] = []


class Publisher:
    """Owns the producer. ``publish`` returns only when the broker acknowledged every record."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics):
        self._settings = settings
        self._metrics = metrics
        self._topic = USAGE_RAW.name
        self._timeout_s = settings.kafka.send_timeout_s
        self._in_flight = InFlight(settings.gateway.max_in_flight_events, settings.gateway.max_in_flight_tenant_share)
        self._producer: AIOKafkaProducer | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._usable = asyncio.Event()
        self._epoch = 0  # counts lost connections
        self._closing = False
        self._pending: dict[tuple[str, str], _Batch] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._waiting: deque[_Ticket] = deque()
        self._event_bytes = 400.0  # encoded size of one event, re-estimated at every request
        self._expirer: asyncio.Task[None] | None = None
        self._connect_failures = 0

    async def start(self) -> None:
        """Connect now if the broker answers; otherwise the keeper keeps trying in the background."""
        self._expirer = asyncio.create_task(self._expire_forever(), name="gateway-ack-deadlines")
        await self._check()
        self._keeper = asyncio.create_task(self._keep_forever(), name="gateway-producer-keeper")

    async def _keep_forever(self) -> None:
        # the flag, not only cancel(): aiokafka swallows CancelledError in places (e.g. while it
        # closes a connection), so a cancelled keeper could otherwise go on forever
        while not self._closing:
            await asyncio.sleep(_CHECK_S)
            await self._check()

    async def _check(self) -> None:
        """Connect if not connected; usable only if the topic is in the broker's metadata now."""
        epoch = self._epoch
        if self._producer is None and not await self._try_connect():
            return
        if await self._topic_exists() and epoch == self._epoch:  # no connection lost meanwhile
            if not self._usable.is_set():
                if self._connect_failures:
                    log.info("Kafka at %s is usable again", self._settings.kafka_bootstrap)
                self._connect_failures = 0
                self._usable.set()
        else:
            self._usable.clear()

    async def _topic_exists(self) -> bool:
        assert self._producer is not None
        for attempt in range(2):
            try:
                cluster = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), _METADATA_TIMEOUT_S)
            except (TimeoutError, KafkaError, OSError):
                return False
            if cluster.partitions_for_topic(self._topic):
                return True
            if attempt == 0:
                await self._ensure_topic()
        return False

    async def _ensure_topic(self) -> None:
        level = logging.WARNING if self._connect_failures == 0 else logging.DEBUG  # one warning per outage
        try:
            await ensure_topics(self._settings, (USAGE_RAW,))
        except Exception as exc:  # no admin rights or broker down: the next metadata check decides
            log.log(level, "could not ensure topic %s: %s", self._topic, exc)
            self._connect_failures += 1

    async def _try_connect(self) -> bool:
        producer = AIOKafkaProducer(
            **producer_kwargs(
                self._settings,
                compression_type=COMPRESSION,
                # no linger: requests are already coalesced per event-loop turn (see module doc), and
                # aiokafka keeps one produce request in flight per broker, so records batch meanwhile
                linger_ms=0,
                # give up on a record when its request got its 503, so a retried request rarely
                # duplicates a late write, and shutdown with the broker gone is bounded
                request_timeout_ms=int(self._timeout_s * 1000),
            )
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            level = logging.WARNING if self._connect_failures == 0 else logging.DEBUG  # one warning per outage
            log.log(
                level, "Kafka producer cannot connect to %s yet (retrying): %s", self._settings.kafka_bootstrap, exc
            )
            self._connect_failures += 1
            await producer.stop()
            return False
        self._watch_connections(producer)
        self._producer = producer
        log.info("Kafka producer connected to %s", self._settings.kafka_bootstrap)
        return True

    def _watch_connections(self, producer: AIOKafkaProducer) -> None:
        """Call ``_connection_lost`` when a connection of the producer breaks.

        aiokafka has no public hook for this; its client passes ``_on_connection_closed`` to every
        connection it opens (and forces a metadata refresh there), so the wrapper goes in its place.
        """
        client = producer.client
        refresh = client._on_connection_closed

        def on_closed(conn: Any, reason: CloseReason) -> None:
            refresh(conn, reason)
            if reason in (CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT):
                self._connection_lost()

        client._on_connection_closed = on_closed

    def _connection_lost(self) -> None:
        """The broker may have restarted (and lost the topic): fail every request waiting for acks,
        send nothing more until the keeper has seen the topic again."""
        self._epoch += 1
        if self._usable.is_set():
            log.warning(
                "lost the connection to Kafka at %s; answering 503 until it is back", self._settings.kafka_bootstrap
            )
        self._usable.clear()
        error = BrokerUnavailable("the connection to Kafka was lost before it acknowledged")
        for ticket in self._waiting:
            if not ticket.future.done():
                ticket.future.set_exception(error)

    async def close(self) -> None:
        self._closing = True
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        for task in (self._keeper, self._expirer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), self._timeout_s + 5)
            except TimeoutError:
                log.warning(
                    "Kafka producer did not stop within %.0fs; undelivered records dropped", self._timeout_s + 5
                )
            self._producer = None

    @property
    def in_flight(self) -> int:
        """Events handed over and not yet acknowledged (or waiting for the broker to be usable)."""
        return self._in_flight.events

    async def ready(self) -> bool:
        """Broker reachable and the topic there, as of the keeper's last check (every ``_CHECK_S``)."""
        return self._usable.is_set()

    async def publish(self, tenant: str, received_at: str, by_project: dict[str, list[Any]], n_events: int) -> None:
        """Return once the broker acknowledged every event; else BrokerUnavailable (503) / Saturated (429)."""
        self._in_flight.admit(tenant, n_events)
        try:
            started = time.monotonic()
            if not self._usable.is_set():
                try:
                    await asyncio.wait_for(self._usable.wait(), min(self._timeout_s, _USABLE_WAIT_S))
                except TimeoutError:
                    raise BrokerUnavailable(f"Kafka at {self._settings.kafka_bootstrap} is not reachable") from None
            await self._enqueue(tenant, received_at, by_project)
        finally:
            self._in_flight.release(tenant, n_events)
        self._metrics.publish_latency.observe(time.monotonic() - started)

    def submit(
        self, tenant: str, received_at: str, by_project: dict[str, list[Any]], n_events: int
    ) -> asyncio.Future[None] | None:
        """``publish`` without a task waiting for it, for a caller that only acts on the outcome
        (the proxy's recorder: a task per event was a tenth of its CPU per call). Returns the
        future of the broker's acks, done as ``publish`` would return or raise; the events count
        as in flight until then. None when the broker is not usable at this moment (nothing was
        sent: call ``publish``, which waits for it a while). Saturated (429) at once, as ``publish``."""
        if not self._usable.is_set():
            return None
        self._in_flight.admit(tenant, n_events)
        started = time.monotonic()
        try:
            future = self._enqueue(tenant, received_at, by_project)
        except BaseException:
            self._in_flight.release(tenant, n_events)
            raise

        def done(future: asyncio.Future[None]) -> None:
            self._in_flight.release(tenant, n_events)
            if not future.cancelled() and future.exception() is None:
                self._metrics.publish_latency.observe(time.monotonic() - started)

        future.add_done_callback(done)
        return future

    def _enqueue(self, tenant: str, received_at: str, by_project: dict[str, list[Any]]) -> asyncio.Future[None]:
        """The events into this turn's batches (sent at its end, ``_flush``): their acks' future."""
        encoded = [(project, self._encode(events)) for project, events in by_project.items()]
        loop = asyncio.get_running_loop()
        ticket = _Ticket(loop.create_future(), time.monotonic() + self._timeout_s)
        self._waiting.append(ticket)
        if not self._pending:
            loop.call_soon(self._flush)
        for project, parts in encoded:
            batch = self._pending.get((tenant, project))
            if batch is None:
                batch = self._pending[(tenant, project)] = _Batch(received_at)
            batch.parts += parts
            batch.tickets.append(ticket)
        return ticket.future

    async def _expire_forever(self) -> None:
        """Fail requests whose acks are overdue (503). One sweeper instead of a timer per request
        (per-request timers were the largest part of publishing in profiles); tickets are queued
        in deadline order, so the sweep stops at the first one still in time."""
        waiting = self._waiting
        tick = min(0.1, self._timeout_s / 10)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            while waiting and (waiting[0].future.done() or waiting[0].deadline <= now):
                ticket = waiting.popleft()
                if not ticket.future.done():
                    ticket.future.set_exception(
                        BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout_s}s")
                    )

    def _flush(self) -> None:
        batches, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._send(batches))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _encode(self, events: list[Any]) -> list[bytes]:
        """Encoded here, in the request's task right after validation, while the events are still in
        the CPU caches: encoding them at the flush, coalesced with other requests' events, cost up to
        twice as much (in-process: 0.42 against 0.7-1.1 us per event). Pre-split by the last observed
        event size, so that an oversized part rarely needs encoding twice."""
        step = max(1, int(MAX_RECORD_BYTES * 0.8 / self._event_bytes))
        parts = []
        for start in range(0, len(events), step):
            parts += encode_events(events[start : start + step])
        self._event_bytes = max(64.0, sum(len(part) for part in parts) / len(events))
        return parts

    async def _send(self, batches: dict[tuple[str, str], _Batch]) -> None:
        producer = self._producer
        planned = []
        for (tenant, project), batch in batches.items():
            if all(ticket.future.done() for ticket in batch.tickets):
                continue  # every request of this batch already got its 503 (connection lost)
            records = encode_records(tenant, project, batch.received_at, batch.parts)
            for ticket in batch.tickets:
                ticket.remaining += len(records)
            planned.append((batch.tickets, records))
        # all counts are set before the first send, so no early ack can release a ticket too soon
        for tickets, records in planned:
            for key, value in records:
                try:
                    if producer is None:
                        raise BrokerUnavailable("the Kafka producer is closed")
                    ack = await producer.send(self._topic, value, key=key)
                except Exception as exc:  # every failure to hand over a record fails its requests
                    self._fail(tickets, exc)
                    break
                ack.add_done_callback(lambda fut, tickets=tickets: self._acked(tickets, fut))

    def _acked(self, tickets: list[_Ticket], ack: asyncio.Future[Any]) -> None:
        if ack.cancelled() or ack.exception() is not None:
            self._fail(tickets, ack.exception() if not ack.cancelled() else None)
            return
        for ticket in tickets:
            ticket.remaining -= 1
            if ticket.remaining == 0 and not ticket.future.done():
                ticket.future.set_result(None)

    @staticmethod
    def _fail(tickets: list[_Ticket], exc: BaseException | None) -> None:
        error = exc if isinstance(exc, BrokerUnavailable) else BrokerUnavailable(f"Kafka refused the write: {exc!r}")
        for ticket in tickets:
            if not ticket.future.done():
                ticket.future.set_exception(error)
