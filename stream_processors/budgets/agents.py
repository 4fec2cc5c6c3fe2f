"""Budgets stage wiring: usage.priced -> budget.deltas -> per-budget state -> budget.state / budget.alerts.

A tenant-wide budget spans projects, i.e. usage.priced partitions, so the stage repartitions:
1. ``repartition`` (usage.priced, keyed tenant/project): match each event to its budgets through
   the scope index and send one delta per (budget, raw partition) of the batch to
   spendstream.budget.deltas, keyed and partitioned by budget id; ack after the delta acks.
2. ``keep_state`` (budget.deltas): the table ``budget_state`` (key budget id, co-partitioned with
   budget.deltas) holds each budget's windows, fired thresholds and per-raw-partition watermarks.
   Per batch, per budget: apply the deltas (replays dropped by the watermarks) to the in-memory
   state, then
   a. send the alerts and the changed budget.state records, await the acks;
   then, in a commit task chained after the previous batch's (``commit``),
   b. record the alerts in ClickHouse ``budget_alerts`` (idempotent by alert_id),
   c. write the table entry once (one changelog record per budget per batch),
   d. ack the input (Faust commits only after flushing the changelog).
   The next batch is applied and its alerts sent while (b) runs (an insert into the embedded
   ClickHouse takes tens to hundreds of milliseconds, which every following alert would wait
   otherwise); commits stay in batch order and at most MAX_PENDING_COMMITS are outstanding.
   A crash before (c) replays the batches from the last saved state: the same alerts with the
   same alert_ids are sent again (notify delivers an alert_id once), nothing is missed and no
   spend is counted twice; no state is saved whose alerts are not in ``budget_alerts``.

Source positions: both agents keep the next offset to process per source partition in the
``budget_state`` table itself (keys ``\x00position|<topic>|<partition>``, written with the batch's
state to the same changelog partition), and check every batch against them
(``positions.split_by_position``): redelivered messages are acked without being processed, and a
jump means the consumer skipped messages, which are then read back directly and processed
before the message that came instead. Faust's committed offsets alone are not enough: with
faust-streaming 0.15.3 on the embedded broker, a worker restarted while input kept arriving
resumed usage.priced partitions 20-70 offsets past the last ones it had processed (about 1 run
in 10 of tests/integration/test_budgets_stage.py), and a Faust ``seek`` back to the position
did not re-deliver them either.

Both agents batch with ``processors.budgets_batch_seconds`` (shorter than the other stages'
``batch_max_seconds``): an alert waits for two of these windows on its way, and a batch here is
cheap (one state write per budget touched).

Budget configs are re-read from ClickHouse every ``budgets_reload_s`` (when changed); nothing is
processed before the first successful load. Deltas of a budget that no longer exists are dropped.

Poison never stalls the stage (``retry.py`` says what is transient and what is data): only
transient errors are retried, and what cannot be processed because of its content goes to
usage.dlq with the reason, counted in ``spendstream_stage_poison_records_total{stage="budgets"}``:
- a usage.priced record ``build_deltas`` fails on (an event without a usable timestamp, ...);
  records that are not priced envelopes at all are only counted: the sink dead-letters those;
- a budget.deltas record that does not decode;
- a budget whose batch cannot be applied or encoded (e.g. a cost that is not an integer):
  its delta records of the batch, while its saved state stays as it was, and the other budgets
  of the batch go on;
- an alert ``budget_alerts`` refuses as data (a Decimal overflow of ``percent_used`` when spend
  is over 10^13 times the limit, an Int64 overflow, ...): the alerts of the batch are inserted in
  halves down to the one refused, which is dead-lettered (``events`` form: the alert and why,
  ``src`` the delta record that raised it). It was sent on budget.alerts already; only its
  history row is missing. The batch then commits as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from spendstream.budgets import BudgetState, Delta, ScopeIndex, alert_value
from spendstream.budgets.store import BudgetReader, insert_alerts
from spendstream.clickhouse import get_client
from spendstream.contracts import dlq_envelope
from spendstream.kafka import client_kwargs
from spendstream.settings import Settings
from spendstream.timeutil import TimestampParser
from spendstream.topics import (
    BUDGET_ALERTS,
    BUDGET_DELTAS,
    BUDGET_STATE,
    USAGE_DLQ,
    USAGE_PRICED,
)
from stream_processors.budgets.logic import RepartitionResult, build_deltas, stable_partition
from stream_processors.budgets.positions import split_by_position
from stream_processors.producer import OutRecord, StageProducer
from stream_processors.retry import (
    CONTENT_ERRORS,
    POISON,
    data_error_label,
    is_data_error,
    reason_of,
    retry_forever,
)

log = logging.getLogger(__name__)

STAGE = "budgets"
#: budget.deltas batches sent but not yet durable (alerts in ClickHouse, changelog written)
MAX_PENDING_COMMITS = 4

EVENTS = Counter("spendstream_budgets_events_total", "Priced events seen by the budgets stage, by outcome", ["outcome"])
ALERTS = Counter("spendstream_budgets_alerts_total", "Alerts sent to spendstream.budget.alerts", ["kind"])
BAD_RECORDS = Counter("spendstream_budgets_bad_records_total", "usage.priced records that are not priced envelopes")
BATCH_SECONDS = Histogram("spendstream_budgets_state_batch_seconds", "Time to apply and write one batch of deltas")
BUDGETS_LOADED = Gauge("spendstream_budgets_loaded", "Live budgets known to the stage", multiprocess_mode="max")
SKIPPED = Counter(
    "spendstream_budgets_skipped_offsets_total", "Source offsets the consumer skipped, read back directly", ["topic"]
)
LOST = Counter(
    "spendstream_budgets_lost_offsets_total", "Skipped source offsets that no longer existed when read back", ["topic"]
)
ALERT_DELAY = Histogram(
    "spendstream_budgets_alert_delay_seconds", "Crossing event's time to the alert being sent (event time lag)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PendingAlert:
    """An alert sent on budget.alerts, still to be recorded in ``budget_alerts``."""

    value: dict[str, Any]
    #: (partition, offset) of the budget.deltas record whose deltas raised it (its dead letter's src)
    src: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Commit:
    """What one batch of budget.deltas must make durable before it is acked."""

    alerts: list[PendingAlert]
    #: (changelog partition, budget id, state) per budget the batch changed
    writes: list[tuple[int, bytes, bytes]]
    positions: dict[int, int]


class BudgetBook:
    """The live budgets, reloaded from ClickHouse; ``ready`` once the first load succeeded."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.index = ScopeIndex()
        self.ready = asyncio.Event()
        self._reader = BudgetReader(settings)

    async def reload_forever(self) -> None:
        while True:
            try:
                index = await asyncio.to_thread(self._reader.read_if_changed)
            except Exception as exc:  # noqa: BLE001 - any ClickHouse trouble: keep the last set
                log.warning("reading budgets failed (%r); %s", exc,
                            "keeping the last set" if self.ready.is_set() else "the stage waits for it")
            else:
                if index is not None:
                    if len(index) != len(self.index):
                        log.info("budgets loaded: %d", len(index))
                    self.index = index
                    BUDGETS_LOADED.set(len(index))
                self.ready.set()
            await asyncio.sleep(self.settings.processors.budgets_reload_s)


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A source message as the agents process it (from Faust, or read back after a skip)."""

    partition: int
    offset: int
    value: bytes


class SourcePositions:
    """The next offset to process per partition of one source topic, kept in the state table;
    messages the consumer skipped are read back directly (a group-less consumer), since Faust's
    own re-delivery after a seek proved unreliable too."""

    READ_TIMEOUT_S = 30.0

    def __init__(self, settings: Settings, table: faust.Table, topic: str):
        self.settings = settings
        self.table = table
        self.topic = topic
        self.reader: AIOKafkaConsumer | None = None
        #: partition -> next offset once the current batch's output is durable
        self.pending: dict[int, int] = {}

    def key(self, partition: int) -> bytes:
        return f"\x00position|{self.topic}|{partition}".encode()

    async def split(self, events: list[faust.EventT]) -> tuple[list[SourceRecord], list[faust.EventT]]:
        """(records to process, in order, skipped ones included; the events to ack afterwards).

        A partition never processed before starts at its first offset: the consumer can skip
        messages on a fresh start too."""
        positions = {}
        for partition in {e.message.partition for e in events}:
            stored = self.table.data.get(self.key(partition))
            positions[partition] = int(stored) if stored is not None else 0
        split = split_by_position([(e.message.partition, e.message.offset) for e in events], positions)
        read_back: dict[tuple[int, int], list[SourceRecord]] = {}
        for partition, start, end in split.gaps:
            read_back[(partition, end)] = await self.read(partition, start, end)
        records: list[SourceRecord] = []
        for i in split.take:
            m = events[i].message
            records += read_back.get((m.partition, m.offset), [])
            records.append(SourceRecord(m.partition, m.offset, m.value))
        self.pending = split.advanced
        return records, [events[i] for i in sorted(split.take + split.stale)]

    async def read(self, partition: int, start: int, end: int) -> list[SourceRecord]:
        """Offsets [start, end) of one partition, read directly from the broker (the part that
        still exists: retention may have deleted the oldest)."""
        if self.reader is None:
            self.reader = AIOKafkaConsumer(**client_kwargs(self.settings), group_id=None, enable_auto_commit=False,
                                           auto_offset_reset="earliest")  # fmt: skip
            await self.reader.start()
        tp = TopicPartition(self.topic, partition)
        self.reader.assign([tp])
        # ListOffsets(EARLIEST) is right on the embedded broker (only LATEST is not)
        first = max(start, (await self.reader.beginning_offsets([tp]))[tp])
        if first > start and start > 0:
            log.error("%s[%d]: skipped offsets %d..%d no longer exist", self.topic, partition, start, first - 1)
            LOST.labels(self.topic).inc(first - start)
        if first >= end:
            return []
        log.warning("%s[%d]: the consumer skipped offsets %d..%d; reading them back", self.topic, partition, first,
                    end - 1)  # fmt: skip
        SKIPPED.labels(self.topic).inc(end - first)
        self.reader.seek(tp, first)
        out: list[SourceRecord] = []
        deadline = time.monotonic() + self.READ_TIMEOUT_S
        while not out or out[-1].offset < end - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.topic}[{partition}]: offsets {first}..{end - 1} could not be read")
            batch = await self.reader.getmany(tp, timeout_ms=500)
            out += [SourceRecord(r.partition, r.offset, r.value) for r in batch.get(tp, []) if r.offset < end]
        return out

    def commit(self) -> None:
        """Record the positions after the batch's output is durable (same changelog as the state)."""
        self.persist(self.advance())

    def advance(self) -> dict[int, int]:
        """Move the in-memory positions past the current batch (the next ``split`` starts there);
        returns them for ``persist``."""
        positions, self.pending = self.pending, {}
        for partition, offset in positions.items():
            self.table.data[self.key(partition)] = str(offset).encode()
        return positions

    def persist(self, positions: dict[int, int]) -> None:
        for partition, offset in positions.items():
            self.table.send_changelog(partition, self.key(partition), str(offset).encode())

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.stop()


def register(app: faust.App, settings: Settings) -> None:
    p = settings.processors
    partitions = settings.kafka.partitions
    lateness_ms = int(p.allowed_lateness_hours * 3_600_000)
    book = BudgetBook(settings)
    parse_ts = TimestampParser()
    # one producer for both agents: started by whichever agent comes first, closed after the
    # consumers stopped
    output = StageProducer(settings, STAGE)
    output_lock = asyncio.Lock()
    alerts_client: list[Any] = []

    async def start_output() -> None:
        async with output_lock:
            await output.start()

    priced = app.topic(USAGE_PRICED.name, key_serializer="raw", value_serializer="raw", partitions=partitions)
    deltas_topic = app.topic(BUDGET_DELTAS.name, key_serializer="raw", value_serializer="raw", partitions=partitions)
    table = app.Table(
        "budget_state", key_type=bytes, value_type=bytes, partitions=partitions,
        help="per budget: windows' spend, fired thresholds, raw-partition watermarks (spendstream.budgets.state)",
    )  # fmt: skip

    priced_positions = SourcePositions(settings, table, USAGE_PRICED.name)
    delta_positions = SourcePositions(settings, table, BUDGET_DELTAS.name)

    @app.on_before_shutdown.connect
    async def stop_clients(sender: faust.App, **kwargs: Any) -> None:
        await output.stop()
        await priced_positions.close()
        await delta_positions.close()

    @app.task
    async def reload_budgets() -> None:
        await book.reload_forever()

    @app.agent(priced, name="budgets-repartition")
    async def repartition(stream: faust.StreamT) -> None:
        await start_output()
        await book.ready.wait()
        async for events in stream.noack_take(p.batch_max_records, within=p.budgets_batch_seconds):
            records, done = await priced_positions.split(events)
            try:
                result = build_deltas(book.index, [r.value for r in records], parse_ts)
                poison: list[OutRecord] = []
            except CONTENT_ERRORS:
                result, poison = deltas_without_poison(records)
            await output.send_all([
                (BUDGET_DELTAS.name, stable_partition(d.budget_id, partitions), d.budget_id.encode(), d.encode())
                for d in result.deltas
            ] + poison)  # fmt: skip
            priced_positions.commit()
            EVENTS.labels("seen").inc(result.events)
            BAD_RECORDS.inc(result.bad_records)
            for event in done:
                await stream.ack(event)

    def dead_letter(topic: str, record: SourceRecord, reason: str, label: str) -> OutRecord:
        """A dead letter of a whole source record (usage.dlq partition = the source partition)."""
        POISON.labels(STAGE, label).inc()
        log.error("%s %d@%d dead-lettered: %s", topic, record.partition, record.offset, reason)
        envelope = dlq_envelope(STAGE, reason, topic, record.partition, record.offset, value=record.value)
        return (USAGE_DLQ.name, record.partition, None, orjson.dumps(envelope))

    def deltas_without_poison(records: list[SourceRecord]) -> tuple[RepartitionResult, list[OutRecord]]:
        """``build_deltas`` of the records it can take, one by one to find the ones it cannot
        (rare: the pricing stage writes none), and their dead letters."""
        good: list[SourceRecord] = []
        poison: list[OutRecord] = []
        for record in records:
            try:
                build_deltas(book.index, [record.value], parse_ts)
            except CONTENT_ERRORS as exc:
                poison.append(dead_letter(USAGE_PRICED.name, record, reason_of(exc, "cannot match to budgets: "),
                                          "unprocessable_priced"))  # fmt: skip
            else:
                good.append(record)
        return build_deltas(book.index, [r.value for r in good], parse_ts), poison

    def record_alerts(values: list[dict[str, Any]]) -> None:
        if not alerts_client:
            alerts_client.append(get_client(settings))
        try:
            insert_alerts(alerts_client[0], values)
        except Exception:
            alerts_client.pop().close()
            raise

    async def handle(records: list[SourceRecord]) -> Commit:
        """Apply the deltas ``records`` to the in-memory state and send their alerts and
        budget.state records; returns what must become durable before the batch is acked."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        grouped: dict[str, tuple[int, list[Delta], list[SourceRecord]]] = {}
        dead: list[OutRecord] = []
        for record in records:
            try:
                delta = Delta.decode(record.value)
            except CONTENT_ERRORS as exc:
                dead.append(dead_letter(BUDGET_DELTAS.name, record, reason_of(exc, "not a delta: "), "bad_delta"))
                continue
            group = grouped.setdefault(delta.budget_id, (record.partition, [], []))
            group[1].append(delta)
            group[2].append(record)
        alerts: list[PendingAlert] = []
        sent: list[OutRecord] = []
        writes: list[tuple[int, bytes, bytes]] = []
        for budget_id, (partition, deltas, sources) in grouped.items():
            budget = book.index.budgets.get(budget_id)
            if budget is None:
                EVENTS.labels("budget_gone").inc(sum(len(evs) for d in deltas for _, evs in d.records))
                continue
            key = budget_id.encode()
            saved = table.data.get(key)
            try:
                state = BudgetState.loads(saved) if saved else BudgetState()
                result = state.apply(budget, deltas, now_ms, lateness_ms)
                values = [alert_value(a, now_ms) for a in result.alerts]
                out = [(BUDGET_ALERTS.name, stable_partition(v["alert_id"], partitions), v["alert_id"].encode(),
                        orjson.dumps(v)) for v in values]  # fmt: skip
                changed = state.state_records(budget, result.touched, now_ms)
                out += [(BUDGET_STATE.name, partition, k, v) for k, v in changed]
                value = state.dumps()
            except CONTENT_ERRORS as exc:
                # the saved state stays as it was: this batch's deltas of the budget are not applied
                reason = reason_of(exc, f"budget {budget_id}: cannot apply or encode: ")
                dead += [dead_letter(BUDGET_DELTAS.name, r, reason, "unappliable") for r in sources]
                continue
            EVENTS.labels("applied").inc(result.applied)
            EVENTS.labels("replayed").inc(result.replayed)
            EVENTS.labels("late").inc(result.late)
            last = sources[-1]
            alerts += [PendingAlert(v, (last.partition, last.offset)) for v in values]
            for alert in result.alerts:
                ALERT_DELAY.observe(max(0.0, (now_ms - alert.event.ts_ms) / 1000))
            sent += out
            # the next batch builds on this state at once; its changelog record waits for the commit
            table.data[key] = value
            writes.append((partition, key, value))
        await output.send_all(sent + dead)
        for a in alerts:
            ALERTS.labels(a.value["kind"]).inc()
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return Commit(alerts, writes, delta_positions.advance())

    async def store_alerts(alerts: list[PendingAlert]) -> None:
        """Record ``alerts`` in ClickHouse; refused as data, in halves down to the alert at fault,
        which is dead-lettered (idempotent: a half stored twice collapses by alert_id)."""
        try:
            async for attempt in retry_forever(STAGE, "clickhouse budget_alerts"):
                with attempt:
                    await asyncio.to_thread(record_alerts, [a.value for a in alerts])
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(alerts) > 1:
                half = len(alerts) // 2
                await store_alerts(alerts[:half])
                await store_alerts(alerts[half:])
                return
            (alert,) = alerts
            reason = reason_of(exc, "budget_alerts refused it: ")
            POISON.labels(STAGE, data_error_label(exc)).inc()
            log.error("alert %s not recorded in budget_alerts: %s", alert.value["alert_id"], reason)
            envelope = dlq_envelope(STAGE, "1 alert not recorded in budget_alerts", BUDGET_DELTAS.name, *alert.src,
                                    events=[{"reason": reason, "event": alert.value}])  # fmt: skip
            await output.send_all([(USAGE_DLQ.name, alert.src[0], alert.value["alert_id"].encode(),
                                    orjson.dumps(envelope))])  # fmt: skip

    async def commit(batch: Commit, previous: asyncio.Task[None] | None, stream: faust.StreamT,
                     done: list[faust.EventT]) -> None:  # fmt: skip
        """Make one batch durable after the batch before it: its alerts in ClickHouse, then its
        state and positions in the changelog, then the acks."""
        if previous is not None:
            await previous
        if batch.alerts:
            await store_alerts(batch.alerts)
        for partition, key, value in batch.writes:
            table.send_changelog(partition, key, value)
        delta_positions.persist(batch.positions)
        for event in done:
            await stream.ack(event)

    def crash_on_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("budget state commit failed; stopping the worker", exc_info=task.exception())
            asyncio.ensure_future(app.crash(task.exception()))

    @app.agent(deltas_topic, name="budgets-state")
    async def keep_state(stream: faust.StreamT) -> None:
        await start_output()
        await book.ready.wait()
        commits: deque[asyncio.Task[None]] = deque()
        try:
            async for events in stream.noack_take(p.batch_max_records, within=p.budgets_batch_seconds):
                while commits and (commits[0].done() or len(commits) >= MAX_PENDING_COMMITS):
                    await commits.popleft()
                records, done = await delta_positions.split(events)
                batch = await handle(records)
                task = asyncio.create_task(commit(batch, commits[-1] if commits else None, stream, done))
                # a failed commit stops the worker even if no further batch comes to notice it
                task.add_done_callback(crash_on_failure)
                commits.append(task)
            while commits:
                await commits.popleft()
        except Exception as exc:
            # Alerts may be out while the state is not saved: only a restart (state from the
            # changelog, batches replayed) is safe; it re-sends the same alert_ids.
            log.exception("budget state batch failed; stopping the worker")
            await app.crash(exc)
        finally:
            for task in commits:
                task.cancel()

