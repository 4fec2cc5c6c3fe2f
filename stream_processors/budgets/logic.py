"""Budgets stage core: usage.priced records -> spendstream.budget.deltas records. Pure: no Kafka,
HTTP or ClickHouse imports; the budget logic itself is spendstream.budgets.

A tenant-wide budget spans projects, i.e. usage.priced partitions, so the stage repartitions:
each priced event goes, as a ``SpendEvent``, into one delta per (budget, raw partition) of the
batch, sent keyed and partitioned by budget id (:func:`stable_partition`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from spendstream.budgets import Attribution, Budget, Delta, ScopeIndex, SpendEvent


def stable_partition(key: str, partitions: int) -> int:
    """The partition of a budget.deltas key (budget id) or budget.alerts key (alert id): a stable
    hash, so a budget's deltas and its table entry always live on one partition, whoever sends."""
    return zlib.crc32(key.encode()) % partitions


@dataclass
class RepartitionResult:
    deltas: list[Delta] = field(default_factory=list)
    events: int = 0
    matched: int = 0
    bad_records: int = 0


def build_deltas(
    index: ScopeIndex, values: Iterable[bytes | None], parse_ts: Callable[[str], int]
) -> RepartitionResult:
    """usage.priced values (in partition order) -> one delta per (budget, raw partition) holding
    every matching event, grouped by raw record. Values that are not priced envelopes are
    counted and skipped (the sink sends them to the DLQ).

    Events of a batch repeat a few attributions (agents of a fleet): the budgets matching an
    attribution are looked up once per batch, and each event is converted once however many
    budgets it counts for."""
    result = RepartitionResult()
    by_key: dict[tuple[str, int], Delta] = {}
    matches: dict[tuple[Any, ...], list[Budget]] = {}
    for value in values:
        try:
            env = orjson.loads(value or b"")
            tenant, src, events = env["tenant"], env["src"], env["events"]
            src_partition, src_offset = src["partition"], src["offset"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            result.bad_records += 1
            continue
        result.events += len(events)
        if not index.has_tenant(tenant):
            continue
        fields, tag_keys = index.match_fields(tenant)
        matched: dict[str, list[SpendEvent]] = {}
        for ev in events:
            tags = ev.get("tags") or {}
            key = (tenant, *(ev.get(f, "") for f in fields), *(tags.get(k) for k in tag_keys))
            budgets = matches.get(key)
            if budgets is None:
                budgets = matches[key] = index.match(tenant, Attribution.of_event(ev))
            if not budgets:
                continue
            spend = SpendEvent(
                ev["event_id"], parse_ts(ev["timestamp"]), ev.get("cost_nanos", 0), ev.get("agent", ""),
                f"{ev.get('provider', '')}/{ev.get('model', '')}",
            )  # fmt: skip
            for b in budgets:
                matched.setdefault(b.id, []).append(spend)
        for budget_id, spend_list in matched.items():
            result.matched += len(spend_list)
            delta = by_key.get((budget_id, src_partition))
            if delta is None:
                delta = by_key[(budget_id, src_partition)] = Delta(tenant, budget_id, src_partition, [])
                result.deltas.append(delta)
            delta.records.append((src_offset, spend_list))
    return result
