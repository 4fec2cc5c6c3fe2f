"""The gateway's in-memory view of budgets, for ``POST /v1/budgets/check`` (no IO per request).

Two background tasks keep it:
- budget configs re-read from ClickHouse ``budgets`` every ``processors.budgets_reload_s``
  (the last good set is kept while ClickHouse is down);
- a consumer without a group reads ``spendstream.budget.state`` from the earliest offset on
  every partition and keeps the latest value per key (budget id + window). It never asks for end
  offsets (the embedded broker's ListOffsets is wrong); it just keeps following the log. Values
  of windows that already ended are dropped: a check only needs the current window.

The view answers only once budgets were loaded and the state log was read up to the fetch high
watermark seen at start-up (``ready``); before that a check would be a guess.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from spendstream.kafka import client_kwargs
from spendstream.settings import Settings
from spendstream.topics import BUDGET_STATE, ensure_topics
from stream_processors.budgets.logic import (
    Attribution,
    BudgetStanding,
    ScopeIndex,
    spent_from_state,
    state_lookup_key,
)
from stream_processors.budgets.store import load_budgets

log = logging.getLogger(__name__)

RETRY_S = 1.0


class BudgetView:
    def __init__(self, settings: Settings):
        self._settings = settings
        self.index = ScopeIndex()
        #: budget.state key -> latest value (current and future windows only)
        self.state: dict[bytes, dict[str, Any]] = {}
        self.budgets_loaded = False
        self.state_caught_up = False
        self._tasks: list[asyncio.Task[None]] = []
        self._client: Any = None

    @property
    def ready(self) -> bool:
        return self.budgets_loaded and self.state_caught_up

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reload_budgets_forever(), name="budget-view-configs"),
            asyncio.create_task(self._follow_state_forever(), name="budget-view-state"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            self._client.close()

    # -- the answer ---------------------------------------------------------------------------
    def check(self, tenant: str, attr: Attribution, estimate_nanos: int, now_ms: int) -> tuple[bool, list[BudgetStanding]]:
        """(allowed, the standing of every budget whose scope covers ``attr``)."""
        standings = []
        for budget in self.index.match(tenant, attr):
            spent, start, end = spent_from_state(budget, self.state.get(state_lookup_key(budget, now_ms)), now_ms)
            standings.append(BudgetStanding(budget, start, end, spent))
        return all(s.allows(estimate_nanos) for s in standings), standings

    # -- keeping it -----------------------------------------------------------------------------
    def _load_budgets(self) -> ScopeIndex:
        from spendstream.clickhouse import get_client

        if self._client is None:
            self._client = get_client(self._settings)
        try:
            return ScopeIndex(load_budgets(self._client))
        except Exception:
            self._client.close()
            self._client = None
            raise

    async def _reload_budgets_forever(self) -> None:
        failing = False
        while True:
            try:
                self.index = await asyncio.to_thread(self._load_budgets)
                self.budgets_loaded, failing = True, False
            except Exception as exc:  # noqa: BLE001 - ClickHouse down or not migrated: keep the last set
                # one warning per outage, not one per reload period
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "budget check: reading budgets failed (%r); keeping %d", exc, len(self.index))
                failing = True
            await asyncio.sleep(self._settings.processors.budgets_reload_s)

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
        while True:
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
        partitions = [TopicPartition(BUDGET_STATE.name, p) for p in sorted(consumer.partitions_for_topic(BUDGET_STATE.name) or ())]
        if not partitions:
            raise KafkaError(f"no partitions for {BUDGET_STATE.name} yet")
        consumer.assign(partitions)
        # after a reconnect the log is read again from the start: every key ends at its latest value
        await consumer.seek_to_beginning(*partitions)
        # caught up once every partition's position reached the fetch high watermark of the
        # first fetch that reported one (after that, records are just followed)
        targets: dict[TopicPartition, int] = {}
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
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
