"""Anomaly stage wiring: usage.priced -> Detector (1-minute buckets) -> budget.alerts (kind anomaly).

The agent ``anomaly`` counts every priced event into its scopes' minute buckets
(``spendstream.anomaly.detector``). A timer (every second) closes each minute ``anomaly.grace_s``
after it ended and scores it, and scores the open minute early for the scopes it already makes
elevated (``Detector.peek``). An alert is sent on spendstream.budget.alerts (acked), then recorded
in ClickHouse ``budget_alerts`` (idempotent by alert_id), from where GET /v1/alerts lists it; the
notify stage delivers it to the tenant's anomaly channels like any budget alert.

Baselines, the tenants' rules and the episodes alerted before a restart come from ClickHouse
(``spendstream.anomaly.store``): the current hour's baselines (and the next hour's shortly before
it starts) are loaded before anything is scored and re-read every ``anomaly.baseline_reload_s``.

Restarts (SIGKILL included): the buckets live in memory only, so an input record is acked only
once every minute it counts in has left the 10-minute window (and the alerts those minutes raised
are recorded). A restarted worker replays the last window from the committed offsets, which
rebuilds the buckets, and restores the open episodes from ``budget_alerts``: an alert already
recorded is not repeated (its episode is open), one sent but not yet recorded is sent again with
the same alert_id (the episode's first minute is in the replay), which notify delivers once.
Minutes are scored only once the replay has caught up (a batch smaller than
``processors.batch_max_records``, or no input for two seconds). At most
``anomaly.max_held_records`` records are held; beyond that the oldest are acked (a crash then
loses those minutes' spend: counted in ``spendstream_anomaly_records_total{outcome="released_early"}``).

Poison: a usage.priced record ``add_record`` cannot read goes to usage.dlq with the reason
(``retry.CONTENT_ERRORS``), counted in ``spendstream_stage_poison_records_total{stage="anomaly"}``;
an alert ``budget_alerts`` refuses as data is dead-lettered (it was sent already). ClickHouse and
Kafka faults are retried (``retry_forever``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from prometheus_client import Counter, Gauge, Histogram

from spendstream.anomaly import Anomaly, Baseline, Detector, Rule, anomaly_alert_value
from spendstream.anomaly.baseline import HOUR_MS, MINUTE_MS
from spendstream.anomaly.detector import WINDOW_MINUTES, minute_of
from spendstream.anomaly.store import Baselines, default_rule, load_baselines, load_episodes, load_rules
from spendstream.budgets.store import insert_alerts
from spendstream.clickhouse import get_client
from spendstream.contracts import dlq_envelope
from spendstream.settings import Settings
from spendstream.timeutil import TimestampParser
from spendstream.topics import BUDGET_ALERTS, USAGE_DLQ, USAGE_PRICED
from stream_processors.anomaly.logic import add_record
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

STAGE = "anomaly"
#: episodes alerted this long before a restart are restored as possibly open
EPISODE_MEMORY_MS = 24 * HOUR_MS
#: no input for this long counts as caught up (scoring starts)
IDLE_CAUGHT_UP_S = 2.0

RECORDS = Counter("spendstream_anomaly_records_total", "usage.priced records seen by the anomaly stage", ["outcome"])
ALERTS = Counter("spendstream_anomaly_alerts_total", "Anomaly alerts sent to spendstream.budget.alerts")
SERIES = Gauge("spendstream_anomaly_series", "Scopes tracked by the anomaly stage", multiprocess_mode="max")
DROPPED_SERIES = Gauge("spendstream_anomaly_dropped_series", "New scopes not tracked (max_series reached)")
BASELINES = Gauge("spendstream_anomaly_baselines", "Scopes with a baseline for the current hour")
SCORE_SECONDS = Histogram("spendstream_anomaly_score_seconds", "Time to score one minute of every scope")


def alert_partition(alert_id: str, partitions: int) -> int:
    """budget.alerts partition of an alert id (the budgets stage's stable hash)."""
    return zlib.crc32(alert_id.encode()) % partitions


@dataclass
class Held:
    event: faust.EventT
    #: newest minute the record counted in; None: nothing counted (acked as soon as it is first)
    minute_ms: int | None


class Context:
    """What the timer and the agent share: baselines per hour, rules, readiness."""

    def __init__(self, settings: Settings):
        self.settings = settings
        a = settings.anomaly
        self.defaults = default_rule(a)
        self.rules: dict[str, Rule] = {}
        self.baselines: dict[int, Baselines] = {}
        self.loaded_at: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.detector = Detector(
            rearm_minutes=a.rearm_minutes, max_series_per_tenant=a.max_series_per_tenant, max_series=a.max_series
        )
        self.client: Any = None

    def rule_of(self, tenant: str) -> Rule:
        return self.rules.get(tenant, self.defaults)

    def baseline_of(self, tenant: str, project: str, agent: str, minute_ms: int) -> Baseline | None:
        hour = self.baselines.get(minute_ms - minute_ms % HOUR_MS)
        return None if hour is None else hour.get((tenant, project, agent))

    def _ch(self) -> Any:
        if self.client is None:
            self.client = get_client(self.settings)
        return self.client

    def _reset(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def load(self, now_ms: int, first: bool) -> None:
        """Sync (a worker thread): rules, the hours' baselines that are due, and on the first
        load the episodes alerted before the restart."""
        a = self.settings.anomaly
        try:
            client = self._ch()
            self.rules = load_rules(client)
            scored = now_ms - int(a.grace_s * 1000) - MINUTE_MS
            # a window reaches back WINDOW_MINUTES minutes, each minute scored against its own hour
            oldest = scored - WINDOW_MINUTES * MINUTE_MS
            hours = {oldest - oldest % HOUR_MS, scored - scored % HOUR_MS, now_ms - now_ms % HOUR_MS}
            upcoming = now_ms - now_ms % HOUR_MS + HOUR_MS
            if upcoming - now_ms < 10 * MINUTE_MS:
                hours.add(upcoming)
            for hour in sorted(hours):
                stale = time.monotonic() - self.loaded_at.get(hour, -1e9) > a.baseline_reload_s
                if hour not in self.baselines or stale:
                    self.baselines[hour] = load_baselines(client, hour, a, self.rules)
                    self.loaded_at[hour] = time.monotonic()
            for hour in [h for h in self.baselines if h not in hours]:
                del self.baselines[hour]
                self.loaded_at.pop(hour, None)
            if first:
                for ep in load_episodes(client, now_ms - EPISODE_MEMORY_MS):
                    self.detector.restore_episode(ep.tenant, ep.project, ep.agent, ep.start_ms, ep.alert_id)
        except Exception:
            self._reset()
            raise
        current = self.baselines.get(now_ms - now_ms % HOUR_MS)
        BASELINES.set(len(current or {}))


def register(app: faust.App, settings: Settings) -> None:
    # the held records are acked minutes after they arrive: Faust would hold a rebalance or a
    # shutdown until they are; the next owner replays them instead (each stage is its own process)
    app.conf.stream_wait_empty = False
    p, a = settings.processors, settings.anomaly
    partitions = settings.kafka.partitions
    ctx = Context(settings)
    detector = ctx.detector
    parse_ts = TimestampParser()
    output = StageProducer(settings, STAGE)
    held: deque[Held] = deque()
    streams: list[faust.StreamT] = []
    progress = {"caught_up": False, "last_batch": time.monotonic()}
    scoring = asyncio.Lock()
    alerts_client: list[Any] = []

    priced = app.topic(USAGE_PRICED.name, key_serializer="raw", value_serializer="raw", partitions=partitions)

    @app.on_before_shutdown.connect
    async def stop_clients(sender: faust.App, **kwargs: Any) -> None:
        await output.stop()

    @app.task
    async def reload_forever() -> None:
        first = True
        while True:
            try:
                await asyncio.to_thread(ctx.load, int(time.time() * 1000), first)
            except Exception as exc:  # noqa: BLE001 - any ClickHouse trouble: keep what we have
                log.warning("loading anomaly baselines failed (%r); %s", exc,
                            "keeping the last ones" if ctx.ready.is_set() else "the stage waits for them")  # fmt: skip
            else:
                first = False
                ctx.ready.set()
            await asyncio.sleep(min(5.0, a.baseline_reload_s))

    def dead_letter(event: faust.EventT, reason: str, label: str) -> OutRecord:
        m = event.message
        POISON.labels(STAGE, label).inc()
        log.error("usage.priced %d@%d dead-lettered: %s", m.partition, m.offset, reason)
        envelope = dlq_envelope(STAGE, reason, USAGE_PRICED.name, m.partition, m.offset, value=m.value)
        return (USAGE_DLQ.name, m.partition, m.key, orjson.dumps(envelope))

    def record_alerts(values: list[dict[str, Any]]) -> None:
        if not alerts_client:
            alerts_client.append(get_client(settings))
        try:
            insert_alerts(alerts_client[0], values)
        except Exception:
            alerts_client.pop().close()
            raise

    async def store_alert(value: dict[str, Any]) -> None:
        try:
            async for attempt in retry_forever(STAGE, "clickhouse budget_alerts"):
                with attempt:
                    await asyncio.to_thread(record_alerts, [value])
        except Exception as exc:
            if not is_data_error(exc):
                raise
            reason = reason_of(exc, "budget_alerts refused it: ")
            POISON.labels(STAGE, data_error_label(exc)).inc()
            envelope = dlq_envelope(STAGE, "1 alert not recorded in budget_alerts", BUDGET_ALERTS.name, 0, 0,
                                    events=[{"reason": reason, "event": value}])  # fmt: skip
            await output.send_all([(USAGE_DLQ.name, 0, value["alert_id"].encode(), orjson.dumps(envelope))])

    async def emit(found: list[Anomaly]) -> None:
        """Send, then record, each alert (in this order: a crash in between re-sends it)."""
        if not found:
            return
        now_ms = int(time.time() * 1000)
        values = [anomaly_alert_value(x, ctx.rule_of(x.tenant).channels, now_ms) for x in found]
        await output.send_all([
            (BUDGET_ALERTS.name, alert_partition(v["alert_id"], partitions), v["alert_id"].encode(), orjson.dumps(v))
            for v in values
        ])  # fmt: skip
        for value in values:
            log.info("anomaly alert %s: %s", value["alert_id"], value["budget_name"])
            await store_alert(value)
        ALERTS.inc(len(values))

    async def release(stream: faust.StreamT) -> None:
        """Ack the held records no window needs any more (in offset order)."""
        horizon = detector.closed_ms - (WINDOW_MINUTES - 1) * MINUTE_MS
        while held and (
            held[0].minute_ms is None or held[0].minute_ms < horizon or len(held) > a.max_held_records
        ):  # fmt: skip
            entry = held.popleft()
            if entry.minute_ms is not None and entry.minute_ms >= horizon:
                RECORDS.labels("released_early").inc()
            await stream.ack(entry.event)

    @app.timer(1.0)
    async def score() -> None:
        if not ctx.ready.is_set():
            return
        if not progress["caught_up"] and time.monotonic() - progress["last_batch"] > IDLE_CAUGHT_UP_S:
            progress["caught_up"] = True
        if not progress["caught_up"]:
            return
        async with scoring:
            now_ms = int(time.time() * 1000)
            due = minute_of(now_ms - int(a.grace_s * 1000)) - MINUTE_MS
            started = time.perf_counter()
            found: list[Anomaly] = []
            if due > detector.closed_ms:
                found += detector.close(due, ctx.baseline_of, ctx.rule_of)
                SCORE_SECONDS.observe(time.perf_counter() - started)
            found += detector.peek(now_ms, ctx.baseline_of, ctx.rule_of, grace_ms=int(a.grace_s * 1000))
            await emit(found)
            SERIES.set(detector.series_count)
            DROPPED_SERIES.set(detector.dropped_series)
            if streams:
                await release(streams[0])

    @app.agent(priced, name="anomaly")
    async def detect(stream: faust.StreamT) -> None:
        await output.start()
        await ctx.ready.wait()
        streams.append(stream)
        async for events in stream.noack_take(p.batch_max_records, within=p.batch_max_seconds):
            dead: list[OutRecord] = []
            for event in events:
                try:
                    newest = add_record(detector, event.message.value, parse_ts)
                except CONTENT_ERRORS as exc:
                    dead.append(dead_letter(event, reason_of(exc, "cannot read for anomalies: "), "unreadable_priced"))
                    newest = None
                RECORDS.labels("seen").inc()
                held.append(Held(event, None if newest is None else minute_of(newest)))
            if dead:
                await output.send_all(dead)
            progress["last_batch"] = time.monotonic()
            if len(events) < p.batch_max_records:
                progress["caught_up"] = True
            async with scoring:
                await release(stream)
