"""Sink wiring: usage.priced -> ClickHouse ``usage_events`` (and through it, every MV).

Records are buffered un-acked until ``sink_batch_rows`` rows are pending or the oldest has
waited ``sink_batch_seconds``. A flush follows OpenMeter's order:
1. pause: the batch goes to the writer task; the agent consumes the next batch meanwhile (so
   decoding overlaps ClickHouse's work) but stops while a second batch waits for the writer,
2. dedupe in batch: drop records at or below the src watermark (also within the batch),
3. write: single-block inserts of at most ``sink_batch_rows`` rows with a dedupe token from their
   offset ranges, retried with backoff until ClickHouse takes them (an outage stalls the sink;
   it never skips a batch),
4. commit: ack the batch's records; Faust commits acked offsets. Batches are written and acked
   one at a time, in order.
Watermarks are re-read from ``ingest_progress`` after every partition assignment (another worker
may have written meanwhile). Records that are not priced envelopes go to usage.dlq.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError
from prometheus_client import Counter, Histogram

from spendstream.contracts import dlq_envelope
from spendstream.settings import Settings
from spendstream.topics import USAGE_DLQ, USAGE_PRICED
from stream_processors.producer import StageProducer
from stream_processors.retry import retry_forever
from stream_processors.sink.logic import (
    BadRecord,
    Insert,
    PricedRecord,
    TimestampParser,
    Watermarks,
    decode_priced,
    dedupe_token,
    plan_inserts,
)
from stream_processors.sink.writer import ENCODING_ERRORS, UsageEventsWriter

log = logging.getLogger(__name__)

STAGE = "sink"

ROWS = Counter("spendstream_sink_rows_total", "Rows inserted into usage_events")
RECORDS = Counter("spendstream_sink_records_total", "usage.priced records by outcome", ["outcome"])
FLUSH_SECONDS = Histogram(
    "spendstream_sink_flush_seconds", "Time to store and ack one batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip


def retryable(exc: BaseException) -> bool:
    """Anything ClickHouse or the connection to it says: wait for it to recover."""
    return isinstance(exc, (ClickHouseError, OSError))


class Sink:
    """Consumes into ``pending``; a flush hands the batch to the writer task, which stores and acks
    batches one at a time, in order, while the next batch is being consumed (at most one batch
    waits for the writer: then consumption pauses)."""

    def __init__(self, app: faust.App, settings: Settings, topic: str):
        self.app = app
        self.topic = topic
        self.batch_rows = settings.processors.sink_batch_rows
        self.batch_seconds = settings.processors.sink_batch_seconds
        self.writer = UsageEventsWriter(settings)
        self.output = StageProducer(settings, STAGE)
        self.parse_ts = TimestampParser()
        self.stream: faust.StreamT | None = None
        self.pending: list[tuple[faust.EventT, PricedRecord | BadRecord]] = []
        self.pending_rows = 0
        self.oldest: float | None = None
        self.batches: asyncio.Queue[list[tuple[faust.EventT, PricedRecord | BadRecord]]] = asyncio.Queue(maxsize=1)
        self.watermarks = Watermarks()
        #: src partitions whose watermark was read from ClickHouse since the last assignment
        self.seeded: set[int] = set()

    async def run(self, stream: faust.StreamT) -> None:
        await self.output.start()
        self.stream = stream.noack()
        writer = asyncio.create_task(self.write_batches(), name="sink-writer")
        try:
            async for event in self.stream.events():
                m = event.message
                try:
                    item: PricedRecord | BadRecord = decode_priced(
                        m.partition, m.offset, int(m.timestamp * 1000), m.value, self.parse_ts
                    )
                    self.pending_rows += item.rows
                except BadRecord as exc:
                    item = exc
                self.pending.append((event, item))
                if self.oldest is None:
                    self.oldest = time.monotonic()
                if self.pending_rows >= self.batch_rows or len(self.pending) >= self.batch_rows:
                    await self.flush()
        finally:
            writer.cancel()
            await self.output.stop()
            self.writer.close()

    async def flush_if_due(self) -> None:
        if self.oldest is not None and time.monotonic() - self.oldest >= self.batch_seconds:
            await self.flush()

    async def flush(self) -> None:
        """Pause: hand the pending records to the writer (waits while it still holds a batch)."""
        batch = self.pending
        if not batch:
            return
        self.pending, self.pending_rows, self.oldest = [], 0, None
        await self.batches.put(batch)

    def on_assigned(self) -> None:
        self.seeded.clear()

    async def write_batches(self) -> None:
        while True:
            batch = await self.batches.get()
            try:
                await self.write_batch(batch)
            except Exception as exc:
                # ClickHouse and Kafka trouble is retried until it passes, so this is a bug.
                # Nothing of this batch was acked: a restart replays it.
                log.exception("sink writer failed; stopping the worker")
                await self.app.crash(exc)
                return

    async def write_batch(self, batch: list[tuple[faust.EventT, PricedRecord | BadRecord]]) -> None:
        """Dedupe in batch, write, then commit (ack) -- in that order."""
        started = time.perf_counter()
        records = [item for _, item in batch if isinstance(item, PricedRecord)]
        bad = [(event, item) for event, item in batch if isinstance(item, BadRecord)]
        if bad:
            await self.send_dlq(
                [(e.message.partition, e.message.offset, e.message.key, e.message.value, str(err)) for e, err in bad]
            )
        await self.seed_watermarks({r.src_partition for r in records})
        new, replays = self.watermarks.split_new(records)
        for insert in plan_inserts(self.topic, new, self.batch_rows):
            await self.write(insert)
            self.watermarks.advance(insert.records)
        assert self.stream is not None
        for event, _ in batch:
            await self.stream.ack(event)
        RECORDS.labels("stored").inc(len(new))
        RECORDS.labels("replay_skipped").inc(len(replays))
        RECORDS.labels("dlq").inc(len(bad))
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def seed_watermarks(self, src_partitions: set[int]) -> None:
        missing = sorted(src_partitions - self.seeded)
        if not missing:
            return
        async for attempt in retry_forever(STAGE, "read ingest_progress", retryable):
            with attempt:
                stored = await asyncio.to_thread(self.writer.load_watermarks, missing)
        self.watermarks.seed(stored)
        self.seeded.update(missing)
        log.info("src watermarks from ClickHouse: %s", {p: stored.get(p) for p in missing})

    async def write(self, insert: Insert) -> None:
        try:
            columns = await asyncio.to_thread(self.writer.encode, insert)
            await self.insert_until_stored(insert, columns)
        except ENCODING_ERRORS as exc:
            if len(insert.records) > 1:
                # Some record cannot be encoded: store the others one by one, dead-letter it.
                for record in insert.records:
                    await self.write(Insert(dedupe_token(self.topic, [record]), [record]))
                return
            record = insert.records[0]
            reason = f"cannot store: {exc!r}"
            await self.send_dlq([(record.partition, record.offset, None, orjson.dumps(record.envelope), reason)])

    async def insert_until_stored(self, insert: Insert, columns: list) -> None:
        async for attempt in retry_forever(STAGE, "clickhouse insert", retryable):
            with attempt:
                await asyncio.to_thread(self.writer.insert, insert, columns)
        ROWS.inc(insert.rows)

    async def send_dlq(self, items: list[tuple[int, int, bytes | None, bytes | None, str]]) -> None:
        """Dead-letter (partition, offset, key, value, reason) items of usage.priced."""
        await self.output.send_all(
            [
                (USAGE_DLQ.name, partition, key,
                 orjson.dumps(dlq_envelope(STAGE, reason, self.topic, partition, offset, value=value)))
                for partition, offset, key, value, reason in items
            ]
        )  # fmt: skip


def register(app: faust.App, settings: Settings) -> None:
    priced = app.topic(
        USAGE_PRICED.name, key_serializer="raw", value_serializer="raw", partitions=settings.kafka.partitions
    )
    sink = Sink(app, settings, USAGE_PRICED.name)

    @app.agent(priced, name="sink")
    async def store(stream: faust.StreamT) -> None:
        await sink.run(stream)

    @app.timer(min(0.1, settings.processors.sink_batch_seconds / 4))
    async def flush_when_due() -> None:
        await sink.flush_if_due()

    @app.on_partitions_assigned.connect
    async def reseed(sender: faust.App, assigned: set, **kwargs) -> None:
        sink.on_assigned()
