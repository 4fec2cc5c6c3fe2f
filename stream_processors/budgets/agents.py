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

Source order: the watermarks drop an event whose raw offset is at or below the highest applied
for its raw partition, so both agents rely on the runtime's consumer
(``stream_processors.runtime.consumer``) handing them each source partition's records in offset
order from the committed offset, without holes; a redelivery after a restart is then a replay
the watermarks drop. (A record skipped and processed after later ones would count as a replay.)

Both agents batch with ``budgets.batch_seconds`` (shorter than the other stages'
``processors.batch_max_seconds``): an alert waits for two of these windows on its way, and a batch here is
cheap (one state write per budget touched).

Budget configs are re-read from ClickHouse every ``budgets.reload_s`` (when changed); nothing is
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
from prometheus_client import Counter, Gauge, Histogram

from spendstream.budgets import BudgetState, Delta, ScopeIndex, alert_value
from spendstream.budgets.store import BudgetReader, insert_alerts
from spendstream.clickhouse import get_client
from spendstream.contracts import dlq_envelope
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
from stream_processors.runtime.producer import OutRecord, StageProducer
from stream_processors.runtime.retry import (
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
                log.warning(
                    "reading budgets failed (%r); %s",
                    exc,
                    "keeping the last set" if self.ready.is_set() else "the stage waits for it",
                )
            else:
                if index is not None:
                    if len(index) != len(self.index):
                        log.info("budgets loaded: %d", len(index))
                    self.index = index
                    BUDGETS_LOADED.set(len(index))
                self.ready.set()
            await asyncio.sleep(self.settings.budgets.reload_s)


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A source message as the agents process it."""

    partition: int
    offset: int
    value: bytes

    @classmethod
    def of(cls, event: faust.EventT) -> SourceRecord:
        return cls(event.message.partition, event.message.offset, event.message.value)


def register(app: faust.App, settings: Settings) -> None:
    p, b = settings.processors, settings.budgets
    partitions = settings.kafka.partitions
    lateness_ms = int(b.allowed_lateness_hours * 3_600_000)
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

    @app.on_before_shutdown.connect
    async def stop_clients(sender: faust.App, **kwargs: Any) -> None:
        await output.stop()

    @app.task
    async def reload_budgets() -> None:
        await book.reload_forever()

    @app.agent(priced, name="budgets-repartition")
    async def repartition(stream: faust.StreamT) -> None:
        await start_output()
        await book.ready.wait()
        async for events in stream.noack_take(p.batch_max_records, within=b.batch_seconds):
            records = [SourceRecord.of(e) for e in events]
            try:
                result = build_deltas(book.index, [r.value for r in records], parse_ts)
                poison: list[OutRecord] = []
            except CONTENT_ERRORS:
                result, poison = deltas_without_poison(records)
            await output.send_all([
                (BUDGET_DELTAS.name, stable_partition(d.budget_id, partitions), d.budget_id.encode(), d.encode())
                for d in result.deltas
            ] + poison)  # fmt: skip
            EVENTS.labels("seen").inc(result.events)
            BAD_RECORDS.inc(result.bad_records)
            for event in events:
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
        return Commit(alerts, writes)

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
        state in the changelog, then the acks."""
        if previous is not None:
            await previous
        if batch.alerts:
            await store_alerts(batch.alerts)
        for partition, key, value in batch.writes:
            table.send_changelog(partition, key, value)
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
            async for events in stream.noack_take(p.batch_max_records, within=b.batch_seconds):
                while commits and (commits[0].done() or len(commits) >= MAX_PENDING_COMMITS):
                    await commits.popleft()
                batch = await handle([SourceRecord.of(e) for e in events])
                task = asyncio.create_task(commit(batch, commits[-1] if commits else None, stream, events))
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
