"""Budgets follow a re-pricing: the spend change of each corrected event reaches the budgets stage
for the budget windows still open; closed windows are left alone; the job's diff says which.

How: per batch of corrections, for each changed event and each budget of the tenant whose scope
matches it (the stage's own :class:`~spendstream.budgets.ScopeIndex`), the event's window is
found as the stage finds it (``calendar_window``; a rolling window ends at the current minute).
An open window (its end after now, or none) gets the change (new cost minus old, possibly
negative) as a ``SpendEvent`` in a ``spendstream.budget.deltas`` record of that budget, sent to
the partition the stage keeps the budget on. The stage applies it like any delta, so thresholds
it crosses alert as usual, with alert ids stable per (budget, window, threshold, limit).

Exactly once: these records carry the source partition :data:`CORRECTIONS_PARTITION` (no
usage.raw partition is negative) and, as offset, ``diff.budget_seq + batch``: ``budget_seq`` is
fixed when a job starts applying (microseconds since the epoch times 1,000, saved with the job),
so offsets only grow from job to job of a tenant (one runs at a time), and a batch sent again by
a resumed job carries the same offset, which the stage's watermark drops as a replay. The deltas
of a batch are sent before its correction rows are inserted, and a batch found corrected already
by its own job (a crash after the insert) is sent again: a crash anywhere loses nothing and
counts nothing twice. Events are sent with their own event time; a budget created after the
events it now matches gets only the change, not their old cost.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from spendstream.budgets import Attribution, Budget, Delta, ScopeIndex, SpendEvent, calendar_window
from spendstream.budgets.windows import MINUTE_MS, ROLLING_MS, minute_of

#: the watermark slot of re-pricing corrections in a budget's state (usage.raw partitions are >= 0)
CORRECTIONS_PARTITION = -1


def delta_partition(budget_id: str, partitions: int) -> int:
    """The budget.deltas partition of a budget: stream_processors.budgets.logic.stable_partition
    (the stage keeps a budget's state on that partition; a test checks both agree)."""
    return zlib.crc32(budget_id.encode()) % partitions


def window_of(budget: Budget, ts_ms: int, now_ms: int) -> tuple[int, int | None, bool]:
    """(start, end, open) of the window of ``budget`` an event at ``ts_ms`` counts in, at ``now_ms``."""
    length = ROLLING_MS.get(budget.window)
    if length is not None:
        end = minute_of(now_ms) + MINUTE_MS
        start = end - length
        return start, end, minute_of(ts_ms) >= start
    start, end = calendar_window(budget.window, budget.timezone, ts_ms)
    return start, end, end is None or end > now_ms


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


class BudgetImpact:
    """The budgets of one tenant a job's corrections meet, at the job's ``now_ms``."""

    def __init__(self, tenant: str, budgets: Iterable[Budget], now_ms: int):
        self.tenant = tenant
        self.now_ms = now_ms
        self.index = ScopeIndex([b for b in budgets if b.tenant == tenant])

    def deltas(self, changes: list[tuple[dict[str, Any], int]], seq: int, windows: dict[str, list[Any]]) -> list[Delta]:
        """The budget.deltas records of one batch's changes ((attribution, new - old nano-USD) per
        event); every window met is added to ``windows`` (the diff's ``budgets``)."""
        if not self.index.has_tenant(self.tenant):
            return []
        by_budget: dict[str, list[SpendEvent]] = {}
        for a, change in changes:
            if change == 0:
                continue
            ts_ms = _ms(a["timestamp"])
            for budget in self.index.match(self.tenant, Attribution.of_event(a)):
                start, end, is_open = window_of(budget, ts_ms, self.now_ms)
                key = "rolling" if budget.window in ROLLING_MS else str(start)
                entry = windows.setdefault(
                    f"{budget.id}|{key}", [budget.id, budget.name, budget.window, start, end, is_open, 0, 0]
                )
                entry[6] += 1
                entry[7] += change
                if is_open:
                    event = SpendEvent(a["event_id"], ts_ms, change, a["agent"], f"{a['provider']}/{a['model']}")
                    by_budget.setdefault(budget.id, []).append(event)
        return [Delta(self.tenant, bid, CORRECTIONS_PARTITION, [(seq, events)]) for bid, events in by_budget.items()]


class DeltaPublisher:
    """Sends budget.deltas records from a worker thread (an event loop of its own, one producer
    for the whole job, started at the first record)."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.producer: Any = None

    def __call__(self, deltas: list[Delta]) -> None:
        if deltas:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self._send(deltas))

    async def _send(self, deltas: list[Delta]) -> None:
        from aiokafka import AIOKafkaProducer

        from spendstream.kafka import producer_kwargs
        from spendstream.topics import BUDGET_DELTAS

        if self.producer is None:
            self.producer = AIOKafkaProducer(**producer_kwargs(self.settings))
            await self.producer.start()
        partitions = self.settings.kafka.partitions
        sent = [
            await self.producer.send(
                BUDGET_DELTAS.name,
                d.encode(),
                key=d.budget_id.encode(),
                partition=delta_partition(d.budget_id, partitions),
            )
            for d in deltas
        ]
        await asyncio.gather(*sent)  # every record acknowledged before the batch's rows are inserted

    def close(self) -> None:
        if self.loop is not None:
            if self.producer is not None:
                self.loop.run_until_complete(self.producer.stop())
            self.loop.close()
            self.loop = None
