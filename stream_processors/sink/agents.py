"""Sink wiring: usage.priced -> ClickHouse ``usage_events_in`` -> ``usage_events`` (and through it, every MV).

Records are taken from the stream in chunks (``noack_take``: nothing is acked until stored) and
buffered until ``sink.batch_rows`` rows are pending or the oldest has waited ``sink.batch_seconds``
(or at once when the sink is caught up after a quiet spell: :meth:`Sink.flush_if_due`); then the writer task takes everything pending. While it writes, consumption goes on, up to
``MAX_INSERT_ROWS`` pending rows (then it pauses), so under a backlog inserts grow to that size:
ClickHouse's cost per insert is large and fixed (six tables, a part each), its cost per row small.
A write follows OpenMeter's order:
1. dedupe in batch: drop records at or below the src watermark (also within the batch),
2. write: inserts of at most ``MAX_INSERT_ROWS`` rows with a dedupe token from their offset
   ranges, retried with backoff until ClickHouse takes them (an outage stalls the sink; it never
   skips a batch); an insert ClickHouse refuses as data is split in halves until the record at
   fault is found, which goes to usage.dlq. Which is which is ``retry.is_transient`` /
   ``retry.is_data_error``, the classification every stage shares,
3. commit: ack the batch's records; Faust commits acked offsets. Batches are written and acked
   one at a time, in order.
Watermarks are re-read from ``ingest_progress`` after every partition assignment (another worker
may have written meanwhile). Records that are not priced envelopes go to usage.dlq. Every
dead-lettered record is counted in ``spendstream_stage_poison_records_total{stage="sink",reason}``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import orjson
from prometheus_client import Counter, Histogram

from spendstream.contracts import dlq_envelope
from spendstream.settings import Settings
from spendstream.timeutil import TimestampParser
from spendstream.topics import USAGE_DLQ, USAGE_PRICED
from stream_processors.runtime.producer import StageProducer
from stream_processors.runtime.retry import (
    POISON,
    data_error_label,
    is_data_error,
    reason_of,
    retry_forever,
)
from stream_processors.sink.logic import (
    BadRecord,
    Insert,
    PricedRecord,
    Watermarks,
    dedupe_token,
    plan_inserts,
    read_priced,
)
from stream_processors.sink.writer import UsageEventsWriter

log = logging.getLogger(__name__)

STAGE = "sink"

ROWS = Counter("spendstream_sink_rows_total", "Rows inserted into usage_events")
RECORDS = Counter(
    "spendstream_sink_records_total",
    "usage.priced records by outcome (refused: by ClickHouse, dead-lettered)",
    ["outcome"],
)
FLUSH_SECONDS = Histogram(
    "spendstream_sink_flush_seconds", "Time to store and ack one batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip


#: rows of one insert at most, and pending rows at which consumption pauses. Measured on the
#: embedded ClickHouse (1M rows of 50-event records, background merges included): 45k rows per
#: ClickHouse CPU second at 10k rows per insert, 108k at 100k, 152k at 250k (parts and
#: deduplication logs in seven tables, two projections: the cost per insert dominates). 250k rows
#: of priced JSON are ~125 MB in the sink while pending, once more while being sent.
MAX_INSERT_ROWS = 250_000
#: records per chunk taken from the stream
TAKE_RECORDS = 1_000

Pending = list[tuple[faust.EventT, PricedRecord | BadRecord]]


class Sink:
    """Consumes into ``pending``; the writer task takes all of it when it is due and stores and
    acks it, while the next batch is being consumed (up to :data:`MAX_INSERT_ROWS` rows)."""

    def __init__(self, app: faust.App, settings: Settings, topic: str):
        self.app = app
        self.topic = topic
        self.batch_rows = min(settings.sink.batch_rows, MAX_INSERT_ROWS)
        self.batch_seconds = settings.sink.batch_seconds
        self.writer = UsageEventsWriter(settings)
        self.output = StageProducer(settings, STAGE)
        self.parse_ts = TimestampParser()
        self.stream: faust.StreamT | None = None
        self.pending: Pending = []
        self.pending_rows = 0
        self.oldest: float | None = None
        #: when the writer last took a batch; with :attr:`caught_up`, spaces idle-time inserts
        self.last_take = 0.0
        #: the last chunk taken from the stream was short: nothing more is waiting in Kafka
        self.caught_up = False
        #: set when pending is due for the writer
        self.due = asyncio.Event()
        #: set when pending has room: consumption goes on
        self.room = asyncio.Event()
        self.room.set()
        self.watermarks = Watermarks()
        #: src partitions whose watermark was read from ClickHouse since the last assignment
        self.seeded: set[int] = set()

    async def run(self, stream: faust.StreamT) -> None:
        await self.output.start()
        self.stream = stream
        writer = asyncio.create_task(self.write_batches(), name="sink-writer")
        try:
            within = min(0.1, self.batch_seconds / 4)
            async for events in stream.noack_take(TAKE_RECORDS, within=within):
                for event in events:
                    m = event.message
                    try:
                        item: PricedRecord | BadRecord = read_priced(
                            m.partition, m.offset, int(m.timestamp * 1000), m.value, m.headers, self.parse_ts
                        )
                        self.pending_rows += item.rows
                    except BadRecord as exc:
                        item = exc
                    self.pending.append((event, item))
                if self.oldest is None and self.pending:
                    self.oldest = time.monotonic()
                self.caught_up = len(events) < TAKE_RECORDS
                self.flush_if_due()
                if self.pending_rows >= self.batch_rows or len(self.pending) >= self.batch_rows:
                    self.due.set()
                if self.pending_rows >= MAX_INSERT_ROWS:
                    self.room.clear()
                    await self.room.wait()
        finally:
            writer.cancel()
            await self.output.stop()
            self.writer.close()

    def flush_if_due(self) -> None:
        """Due when the oldest pending record waited the batch window, or at once when the sink is
        caught up and the last insert began a window ago: a record after a quiet spell waits for
        nothing, and inserts still come at most once per window when records trickle in."""
        if self.oldest is None:
            return
        now = time.monotonic()
        if now - self.oldest >= self.batch_seconds or (self.caught_up and now - self.last_take >= self.batch_seconds):
            self.due.set()

    def take_pending(self) -> Pending:
        batch = self.pending
        self.pending, self.pending_rows, self.oldest = [], 0, None
        self.last_take = time.monotonic()
        self.due.clear()
        self.room.set()
        return batch

    def on_assigned(self) -> None:
        self.seeded.clear()

    async def write_batches(self) -> None:
        while True:
            await self.due.wait()
            batch = self.take_pending()
            if not batch:
                continue
            try:
                await self.write_batch(batch)
            except Exception as exc:
                # transient trouble is retried until it passes and refused data dead-lettered,
                # so this is a bug.
                # Nothing of this batch was acked: a restart replays it.
                log.exception("sink writer failed; stopping the worker")
                await self.app.crash(exc)
                return

    async def write_batch(self, batch: Pending) -> None:
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
        for insert in plan_inserts(self.topic, new, MAX_INSERT_ROWS):
            await self.write(insert)
            self.watermarks.advance(insert.records)
        assert self.stream is not None
        for event, _ in batch:
            await self.stream.ack(event)
        RECORDS.labels("stored").inc(len(new))
        RECORDS.labels("replay_skipped").inc(len(replays))
        RECORDS.labels("dlq").inc(len(bad))
        POISON.labels(STAGE, "bad_record").inc(len(bad))
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def seed_watermarks(self, src_partitions: set[int]) -> None:
        missing = sorted(src_partitions - self.seeded)
        if not missing:
            return
        async for attempt in retry_forever(STAGE, "read ingest_progress"):
            with attempt:
                stored = await asyncio.to_thread(self.writer.load_watermarks, missing)
        self.watermarks.seed(stored)
        self.seeded.update(missing)
        log.info("src watermarks from ClickHouse: %s", {p: stored.get(p) for p in missing})

    async def write(self, insert: Insert) -> None:
        """Store ``insert``; if ClickHouse refuses its data, store its halves the same way, down to
        single records, and dead-letter a single record it refuses. Halves keep their order, so
        each src partition's stored records stay a prefix-closed run (the watermark's premise)."""
        try:
            async for attempt in retry_forever(STAGE, "clickhouse insert"):
                with attempt:
                    await asyncio.to_thread(self.writer.insert, insert)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            records = insert.records
            if len(records) > 1:
                log.warning("ClickHouse refused an insert of %d records as data (%s): splitting it", len(records), exc)
                half = len(records) // 2
                for part in (records[:half], records[half:]):
                    await self.write(Insert(dedupe_token(self.topic, part), part))
                return
            record = records[0]
            await self.send_dlq([(record.partition, record.offset, None, record.value,
                                  reason_of(exc, "ClickHouse refused it: "))])  # fmt: skip
            RECORDS.labels("refused").inc()
            POISON.labels(STAGE, data_error_label(exc)).inc()
            return
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

    @app.timer(min(0.1, settings.sink.batch_seconds / 4))
    async def flush_when_due() -> None:
        sink.flush_if_due()

    @app.on_partitions_assigned.connect
    async def reseed(sender: faust.App, assigned: set, **kwargs) -> None:
        sink.on_assigned()
