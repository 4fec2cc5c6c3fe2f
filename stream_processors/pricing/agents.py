"""Pricing stage wiring: usage.raw -> (dedupe, price) -> usage.priced / usage.dlq.

Per batch (``noack_take``: nothing is acked until we say so):
1. price the batch (``PricingStage.process``, in a worker thread so heartbeats keep flowing),
2. queue the batch's dedupe chunks (and deletions of expired ones) to the table's changelog, to
   the raw record's partition so the state moves with its partition,
3. send the priced and dead-letter records and await every ack,
4. ack the input. Faust commits acked offsets only after flushing its own producer, which
   carries the changelog writes: offsets are never committed ahead of output or dedupe state.
A crash anywhere before 4 replays the batch; the replay rule in ``logic`` makes it harmless.

Poison never stalls the stage: what ``logic`` cannot price or write (see its docstring) goes to
usage.dlq with the reason in the same send, and is counted in
``spendstream_stage_poison_records_total{stage="pricing",reason}``. An event priced above the
per-event cap is written flagged ``cost_over_cap`` at cost 0 and counted in
``spendstream_pricing_cost_over_cap_events_total``. Only Kafka's transient errors are retried
(``StageProducer``); anything else stops the worker and the restart replays the batch.

Tenant overrides are reloaded from ClickHouse ``price_overrides`` every
``settings.pricing.overrides_reload_s``. The stage prices nothing before the first successful
load (a price without a tenant's override would be wrong); afterwards a ClickHouse outage keeps
the last set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from spendstream.pricing import OverrideBook, default_catalog
from spendstream.settings import Settings
from spendstream.topics import USAGE_DLQ, USAGE_PRICED, USAGE_RAW
from stream_processors.pricing.logic import STAGE, PricingStage, RawRecord
from stream_processors.runtime.producer import MAX_RECORD_BYTES, StageProducer
from stream_processors.runtime.retry import POISON

log = logging.getLogger(__name__)

EVENTS = Counter("spendstream_pricing_events_total", "Events by outcome", ["outcome"])
UNKNOWN_MODEL = Counter(
    "spendstream_pricing_unknown_model_events_total",
    "Events stored at cost 0 with pricing_status='unknown_model' (add a price, then re-price)",
)
COST_OVER_CAP = Counter(
    "spendstream_pricing_cost_over_cap_events_total",
    "Events whose catalog or override price exceeded the per-event cap, stored at cost 0 with "
    "pricing_status='cost_over_cap' (fix the price, then re-price)",
)
DLQ_RECORDS = Counter("spendstream_pricing_dlq_records_total", "Dead-letter records written")
SKIPPED_OFFSETS = Counter(
    "spendstream_pricing_skipped_offsets_total", "usage.raw offsets that never reached the pricing agent (must stay 0)"
)
RECORDS = Counter("spendstream_pricing_records_total", "usage.raw records consumed")
BATCH_SECONDS = Histogram("spendstream_pricing_batch_seconds", "Time to price and write one batch")
DEDUPE_IDS = Gauge("spendstream_pricing_dedupe_ids", "Event ids in the dedupe index", multiprocess_mode="livesum")
OVERRIDES_LOADED_AT = Gauge(
    "spendstream_pricing_overrides_loaded_timestamp_seconds",
    "When price_overrides was last read",
    multiprocess_mode="max",
)
OVERRIDES_RELOAD_FAILURES = Counter(
    "spendstream_pricing_overrides_reload_failures_total", "Reads of price_overrides that failed (last set kept)"
)
OVERRIDES_REJECTED = Gauge(
    "spendstream_pricing_overrides_rejected",
    "price_overrides rows that failed validation",
    multiprocess_mode="livesum",
)


class OverrideRows:
    """Reads the current ``price_overrides`` rows (latest version, not deleted); blocking. Keeps
    one client between reads and drops it after an error, so the next read reconnects."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: Any = None

    def read(self) -> list[dict[str, Any]]:
        from spendstream.clickhouse import get_client

        if self._client is None:
            self._client = get_client(self._settings)
        try:
            rows = list(self._client.query("SELECT * FROM price_overrides FINAL WHERE deleted = 0").named_results())
        except Exception:
            self._client.close()
            self._client = None
            raise
        for row in rows:
            # the table's column for the per-request price; OverrideBook reads per_request_usd
            row.setdefault("per_request_usd", row.get("request_usd"))
        return rows


def register(app: faust.App, settings: Settings) -> None:
    p = settings.processors
    stage = PricingStage(
        default_catalog(),
        USAGE_RAW.name,
        int(settings.pricing.dedupe_window_hours * 3_600_000),
        max_record_bytes=MAX_RECORD_BYTES,
    )
    # raw codecs: Faust must not decode (it would JSON-parse every value, and ack and skip a
    # value it cannot parse instead of handing it to us for the DLQ)
    raw = app.topic(USAGE_RAW.name, key_serializer="raw", value_serializer="raw", partitions=settings.kafka.partitions)
    dedupe = app.Table(
        "dedupe",
        key_type=bytes,
        value_type=bytes,
        partitions=settings.kafka.partitions,
        help="pricing dedupe state: chunks of ids first seen per raw partition (see pricing/dedupe.py)",
    )
    output = StageProducer(settings, STAGE)
    # one batch at a time, and never while the index is being rebuilt
    state_lock = asyncio.Lock()
    overrides_ready = asyncio.Event()

    @dedupe.on_recover
    async def rebuild_index() -> None:
        async with state_lock:
            stage.index.rebuild(list(dedupe.data.items()))
            DEDUPE_IDS.set(len(stage.index))
        log.info("dedupe index rebuilt: %d ids in %d chunks", len(stage.index), stage.index.chunk_count)

    override_rows = OverrideRows(settings)

    @app.task
    async def reload_overrides() -> None:
        last_rows: list[dict[str, Any]] | None = None
        while True:
            try:
                rows = await asyncio.to_thread(override_rows.read)
            except Exception as exc:  # noqa: BLE001 - any ClickHouse trouble: keep the last set
                OVERRIDES_RELOAD_FAILURES.inc()
                log.warning(
                    "reading price_overrides failed (%r); %s",
                    exc,
                    "keeping the last set" if overrides_ready.is_set() else "pricing waits for it",
                )
            else:
                if rows != last_rows:
                    book = OverrideBook.from_rows(rows, stage.catalog)
                    for ident, reason in book.rejected:
                        log.error("price override %s rejected: %s", ident, reason)
                    stage.overrides = book
                    last_rows = rows
                    OVERRIDES_REJECTED.set(len(book.rejected))
                    log.info("price overrides loaded: %d rows", len(rows))
                OVERRIDES_LOADED_AT.set_to_current_time()
                overrides_ready.set()
            await asyncio.sleep(settings.pricing.overrides_reload_s)

    def owned_raw_partitions() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == raw.get_topic_name()}

    #: raw partition -> offset of the last record priced; a tripwire for skipped input, observability
    #: only: contiguous delivery is the runtime consumer's guarantee (runtime/consumer.py), and if
    #: this ever fires, that guarantee broke
    last_priced: dict[int, int] = {}

    @app.on_partitions_revoked.connect
    async def forget_positions(sender: faust.App, revoked: set, **kwargs) -> None:
        last_priced.clear()

    def note_positions(records: list[RawRecord]) -> None:
        for r in records:
            previous = last_priced.get(r.partition)
            if previous is not None and r.offset > previous + 1:
                SKIPPED_OFFSETS.inc(r.offset - previous - 1)
                log.error(
                    "usage.raw partition %d: offsets %d..%d skipped (priced %d, then %d)",
                    r.partition,
                    previous + 1,
                    r.offset - 1,
                    previous,
                    r.offset,
                )
            last_priced[r.partition] = r.offset

    async def handle(events: list[faust.EventT]) -> None:
        started = time.perf_counter()
        records = [RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value) for e in events]
        note_positions(records)
        result = await asyncio.to_thread(stage.process, records, int(time.time() * 1000), owned_raw_partitions())
        for partition, key, value in result.chunk_writes:
            if value is None:
                dedupe.data.pop(key, None)
            else:
                dedupe.data[key] = value
            dedupe.send_changelog(partition, key, value)
        await output.send_all(
            [(USAGE_PRICED.name, o.partition, o.key, o.value, o.headers) for o in result.priced]
            + [(USAGE_DLQ.name, o.partition, o.key, o.value) for o in result.dlq]
        )
        RECORDS.inc(len(records))
        EVENTS.labels("priced").inc(result.events_priced - result.replayed)
        EVENTS.labels("replayed").inc(result.replayed)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("rejected").inc(result.rejected_events)
        UNKNOWN_MODEL.inc(result.unknown_model)
        COST_OVER_CAP.inc(result.cost_over_cap)
        DLQ_RECORDS.inc(len(result.dlq))
        for reason, count in result.poison.items():
            POISON.labels(STAGE, reason).inc(count)
        DEDUPE_IDS.set(len(stage.index))
        BATCH_SECONDS.observe(time.perf_counter() - started)

    @app.agent(raw, name="pricing")
    async def price_raw(stream: faust.StreamT) -> None:
        await output.start()
        try:
            await overrides_ready.wait()
            async for events in stream.noack_take(p.batch_max_records, within=p.batch_max_seconds):
                try:
                    async with state_lock:
                        await handle(events)
                except Exception as exc:
                    # The index may now hold ids whose output was never sent: only a restart
                    # (index rebuilt from the table, batch replayed) is safe.
                    log.exception("pricing batch failed; stopping the worker")
                    await app.crash(exc)
                    return
                for event in events:
                    await stream.ack(event)
        finally:
            await output.stop()
