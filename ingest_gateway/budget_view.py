"""The gateway's in-memory view of budgets, for ``POST /v1/budgets/check`` (no IO per request).

Two background tasks keep it:
- budget configs polled from ClickHouse ``budgets`` every ``budgets.reload_s``: a
  cheap fingerprint query, and the full read only when it changed (the last good set is kept
  while ClickHouse is down);
- a consumer without a group reads ``spendstream.budget.state`` from the earliest offset on
  every partition and keeps the latest value per key (budget id + window). It never asks for end
  offsets (the embedded broker's ListOffsets is wrong); it just keeps following the log. Values
  of windows that already ended are dropped: a check only needs the current window.

Staleness: a check answers with the spend the budgets stage last published, exactly (integer
nano-USD), never an estimate. That value trails the events acknowledged by the gateway by the
pipeline's latency (pricing, then the budgets stage's batch; under a second when the stages keep
up) plus this consumer's fetch; a budget created or changed shows up within
``budgets.reload_s``. While ClickHouse or the broker is unreachable, the last known configs and
spend are served. The view answers only once budgets were loaded and the state log was read up
to the fetch high watermark seen at start-up (``ready``); before that a check would be a guess.

Per check: a scope-index lookup, one dict read per matching budget, and the budget's current
window (cached until it ends, so calendar arithmetic in the budget's time zone runs once per
window, not per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from spendstream.budgets import (
    ROLLING_MS,
    Attribution,
    Budget,
    BudgetStanding,
    ScopeIndex,
    current_window,
    spent_in_window,
    window_state_key,
)
from spendstream.budgets.store import BudgetReader
from spendstream.kafka import client_kwargs
from spendstream.settings import Settings
from spendstream.topics import BUDGET_STATE, ensure_topics

log = logging.getLogger(__name__)

RETRY_S = 1.0
#: budget.state records applied per event-loop turn: a long backlog (start-up, a burst) must not
#: hold up the checks being answered meanwhile
MAX_RECORDS_PER_TURN = 500


class BudgetView:
    def __init__(self, settings: Settings):
        self._settings = settings
        self.index = ScopeIndex()
        #: budget.state key -> latest value (current and future windows only)
        self.state: dict[bytes, dict[str, Any]] = {}
        #: budget id -> (start, end) of the calendar window last in force (cleared with the configs)
        self._windows: dict[str, tuple[int, int | None]] = {}
        self.budgets_loaded = False
        self.state_caught_up = False
        self._tasks: list[asyncio.Task[None]] = []
        #: checked by the loops: aiokafka's ``consumer.stop()`` can swallow a cancel, which would
        #: otherwise leave a loop running and ``close()`` waiting for ever
        self._closing = False
        self._reader = BudgetReader(settings)

    @property
    def ready(self) -> bool:
        return self.budgets_loaded and self.state_caught_up

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reload_budgets_forever(), name="budget-view-configs"),
            asyncio.create_task(self._follow_state_forever(), name="budget-view-state"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._reader.close()

    # -- the answer ---------------------------------------------------------------------------
    def check(
        self, tenant: str, attr: Attribution, estimate_nanos: int, now_ms: int
    ) -> tuple[bool, list[BudgetStanding]]:
        """(allowed, the standing of every budget whose scope covers ``attr``)."""
        standings = []
        for budget in self.index.match(tenant, attr):
            start, end = self._window(budget, now_ms)
            spent = spent_in_window(budget, self.state.get(window_state_key(budget, start)), start)
            standings.append(BudgetStanding(budget, start, end, spent))
        return all(s.allows(estimate_nanos) for s in standings), standings

    def _window(self, budget: Budget, now_ms: int) -> tuple[int, int | None]:
        if budget.window in ROLLING_MS:  # plain arithmetic, nothing to cache
            return current_window(budget, now_ms)
        cached = self._windows.get(budget.id)
        if cached is not None and cached[0] <= now_ms and (cached[1] is None or now_ms < cached[1]):
            return cached
        self._windows[budget.id] = window = current_window(budget, now_ms)
        return window

    # -- keeping it -----------------------------------------------------------------------------
    async def _reload_budgets_forever(self) -> None:
        failing = False
        while not self._closing:
            try:
                index = await asyncio.to_thread(self._reader.read_if_changed)
                if index is not None:
                    # a changed budget may have a new window or time zone
                    self.index, self._windows = index, {}
                self.budgets_loaded, failing = True, False
            except Exception as exc:  # noqa: BLE001 - ClickHouse down or not migrated: keep the last set
                # one warning per outage, not one per reload period
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "budget check: reading budgets failed (%r); keeping %d",
                    exc,
                    len(self.index),
                )
                failing = True
            await asyncio.sleep(self._settings.budgets.reload_s)

    def apply(self, key: bytes, value: bytes | None, now_ms: int) -> None:
        if value is None:
            self.state.pop(key, None)
            return
        record = orjson.loads(value)
        end = record.get("window_end")
        if end is not None and end <= now_ms and record.get("buckets") is None:
            # a calendar window that is over: never the current one again
            self.state.pop(key, None)
        else:
            self.state[key] = record

    async def _follow_state_forever(self) -> None:
        while not self._closing:
            consumer = AIOKafkaConsumer(**client_kwargs(self._settings), group_id=None, enable_auto_commit=False)
            try:
                await ensure_topics(self._settings, (BUDGET_STATE,))
                await consumer.start()
                await self._follow(consumer)
            except (KafkaError, OSError) as exc:
                log.warning("budget check: following %s failed (%r); retrying", BUDGET_STATE.name, exc)
            finally:
                await consumer.stop()
            await asyncio.sleep(RETRY_S)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        partitions = [
            TopicPartition(BUDGET_STATE.name, p) for p in sorted(consumer.partitions_for_topic(BUDGET_STATE.name) or ())
        ]
        if not partitions:
            raise KafkaError(f"no partitions for {BUDGET_STATE.name} yet")
        consumer.assign(partitions)
        # after a reconnect the log is read again from the start: every key ends at its latest value
        await consumer.seek_to_beginning(*partitions)
        # caught up once every partition's position reached the fetch high watermark of the
        # first fetch that reported one (after that, records are just followed)
        targets: dict[TopicPartition, int] = {}
        while not self._closing:
            batch = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS_PER_TURN)
            now_ms = int(time.time() * 1000)
            for records in batch.values():
                for r in records:
                    self.apply(r.key, r.value, now_ms)
            if not self.state_caught_up:
                for tp in partitions:
                    if tp not in targets and consumer.highwater(tp) is not None:
                        targets[tp] = consumer.highwater(tp)
                if len(targets) == len(partitions) and all(await self._reached(consumer, targets)):
                    self.state_caught_up = True
                    log.info("budget check: %s read, %d current windows", BUDGET_STATE.name, len(self.state))

    @staticmethod
    async def _reached(consumer: AIOKafkaConsumer, targets: dict[TopicPartition, int]) -> list[bool]:
        return [await consumer.position(tp) >= hw for tp, hw in targets.items()]
