"""Sink core: usage.priced records -> columns of ``usage_events``. Pure: no Kafka/ClickHouse imports.

A flush takes the records consumed since the last one and
1. decodes them (:func:`decode_priced`; a record that is not a priced envelope goes to the DLQ),
2. drops records already stored (:class:`Watermarks`): a record whose ``src.offset`` is not above
   the highest one stored for its ``src.partition`` is a replay, either of a pricing-stage record
   re-priced after a crash (see spendstream/contracts.py) or of one this sink stored before it
   crashed and had not committed yet,
3. cuts the rest into inserts (:func:`plan_inserts`) at record boundaries, at most ``max_rows``
   rows each, every one carrying an ``insert_deduplication_token`` derived from the offset ranges
   it holds, so an insert retried after an error is a no-op in ClickHouse,
4. turns each insert into columns (:func:`to_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from spendstream.contracts import COST_CLASSES, SCHEMA_VERSION, TOKEN_FIELDS

#: usage_events columns the sink writes, in insert order (every column of the table but none
#: with a default, see clickhouse/schema/0001_usage_events.sql).
COLUMNS: tuple[str, ...] = (
    "tenant", "project", "agent", "user", "session_id", "operation", "tags", "provider", "model",
    *TOKEN_FIELDS,
    "cost_nanos", *(f"cost_{c}_nanos" for c in COST_CLASSES),
    "price_id", "pricing_status", "price_source", "status", "latency_ms",
    "event_id", "timestamp", "received_at", "partition", "offset", "src_partition", "src_offset",
)  # fmt: skip

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class BadRecord(ValueError):
    """A usage.priced value that is not a v1 priced envelope; the message says why."""


@dataclass(frozen=True, slots=True)
class PricedRecord:
    """One usage.priced record: where it was read, and the envelope it holds."""

    partition: int
    offset: int
    #: the record's Kafka timestamp in ms; part of the dedupe token (see :func:`dedupe_token`)
    timestamp_ms: int
    envelope: dict[str, Any]

    @property
    def src_partition(self) -> int:
        return self.envelope["src"]["partition"]

    @property
    def src_offset(self) -> int:
        return self.envelope["src"]["offset"]

    @property
    def rows(self) -> int:
        return len(self.envelope["events"])


def decode_priced(
    partition: int, offset: int, timestamp_ms: int, value: bytes | None, parse_ts: TimestampParser
) -> PricedRecord:
    """Parse and shape-check one usage.priced value; raise :class:`BadRecord` if unusable.

    Field types inside events are the pricing stage's promise and are not re-checked here; an
    insert that still fails to encode is split record by record (see the writer)."""
    if value is None:
        raise BadRecord("empty value")
    try:
        env = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(env, dict):
        raise BadRecord("not a JSON object")
    if env.get("v") != SCHEMA_VERSION:
        raise BadRecord(f"unsupported envelope version {env.get('v')!r}")
    src = env.get("src")
    if not (isinstance(src, dict) and _is_uint(src.get("partition")) and _is_uint(src.get("offset"))):
        raise BadRecord("missing or invalid src {partition, offset}")
    for key in ("tenant", "project", "received_at"):
        if not isinstance(env.get(key), str):
            raise BadRecord(f"missing or invalid {key}")
    events = env.get("events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise BadRecord("events is not a list of objects")
    try:
        parse_ts(env["received_at"])
        for event in events:
            parse_ts(event["timestamp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRecord(f"missing or invalid timestamp: {exc}") from None
    return PricedRecord(partition, offset, timestamp_ms, env)


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


class Watermarks:
    """Highest ``src.offset`` stored per ``src.partition``; records at or below it are replays.

    Seeded from ClickHouse (``ingest_progress``) when partitions are assigned, advanced by every
    successful insert. A partition absent from the seed has stored nothing yet.
    """

    def __init__(self, stored: dict[int, int] | None = None):
        self._high: dict[int, int] = dict(stored or {})

    def get(self, src_partition: int) -> int | None:
        return self._high.get(src_partition)

    def seed(self, stored: dict[int, int]) -> None:
        """Take ClickHouse's word for these partitions (read after an assignment)."""
        self._high.update(stored)

    def as_dict(self) -> dict[int, int]:
        return dict(self._high)

    def split_new(self, records: list[PricedRecord]) -> tuple[list[PricedRecord], list[PricedRecord]]:
        """(new records, replays) in input order; compares within the batch too, so a record
        repeated later in the same batch is a replay. Does not advance: see :meth:`advance`."""
        high = dict(self._high)
        new: list[PricedRecord] = []
        replays: list[PricedRecord] = []
        for record in records:
            p, o = record.src_partition, record.src_offset
            seen = high.get(p)
            if seen is not None and o <= seen:
                replays.append(record)
            else:
                high[p] = o
                new.append(record)
        return new, replays

    def advance(self, stored: list[PricedRecord]) -> None:
        """Record that ``stored`` is now in ClickHouse."""
        for record in stored:
            p, o = record.src_partition, record.src_offset
            seen = self._high.get(p)
            if seen is None or o > seen:
                self._high[p] = o


def dedupe_token(topic: str, records: list[PricedRecord]) -> str:
    """``insert_deduplication_token`` for an insert of ``records``: each usage.priced partition's
    offset range in it, e.g. ``spendstream.usage.priced:0:10-17@1718000000123,2:4-9@1718000000345``.

    The ranges say which records; the first record's Kafka timestamp per range tells apart two logs
    that reuse offsets (the memory-only embedded broker restarts at offset 0 while ClickHouse keeps
    its dedup log), where bare ranges would make ClickHouse silently drop a new batch.
    """
    ranges: dict[int, tuple[PricedRecord, PricedRecord]] = {}
    for record in records:
        first = ranges[record.partition][0] if record.partition in ranges else record
        ranges[record.partition] = (first, record)
    parts = (f"{p}:{first.offset}-{last.offset}@{first.timestamp_ms}" for p, (first, last) in sorted(ranges.items()))
    return f"{topic}:" + ",".join(parts)


@dataclass(frozen=True, slots=True)
class Insert:
    token: str
    records: list[PricedRecord]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.records)


def plan_inserts(topic: str, records: list[PricedRecord], max_rows: int) -> list[Insert]:
    """Cut records into inserts of at most ``max_rows`` rows at record boundaries (a single larger
    record stays whole), keeping their order, so each partition's records stay in offset order.
    One insert spans partitions: every insert costs ClickHouse a fixed overhead per MV. Records
    without events are left out: they store nothing."""
    inserts: list[Insert] = []
    chunk: list[PricedRecord] = []
    rows = 0
    for record in records:
        if not record.rows:
            continue
        if chunk and rows + record.rows > max_rows:
            inserts.append(Insert(dedupe_token(topic, chunk), chunk))
            chunk, rows = [], 0
        chunk.append(record)
        rows += record.rows
    if chunk:
        inserts.append(Insert(dedupe_token(topic, chunk), chunk))
    return inserts


class TimestampParser:
    """RFC 3339 -> epoch milliseconds, exactly (ints, no float). The gateway normalises event time
    to ``YYYY-MM-DDTHH:MM:SS.mmmZ``; that shape takes a cached fast path (events of a batch share
    few seconds), anything else goes through ``datetime.fromisoformat``."""

    def __init__(self, cache_size: int = 65_536):
        self._seconds: dict[str, int] = {}
        self._cache_size = cache_size

    def __call__(self, value: str) -> int:
        if len(value) == 24 and value[19] == "." and value[23] == "Z":
            head = value[:19]
            seconds = self._seconds.get(head)
            if seconds is None:
                if len(self._seconds) >= self._cache_size:
                    self._seconds.clear()
                seconds = self._seconds[head] = self._parse_ms(head + "Z") // 1000
            return seconds * 1000 + int(value[20:23])
        return self._parse_ms(value)

    @staticmethod
    def _parse_ms(value: str) -> int:
        instant = datetime.fromisoformat(value)
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=timezone.utc)
        delta = instant - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


_COST_KEYS = tuple(COST_CLASSES)


def to_columns(records: list[PricedRecord], parse_ts: TimestampParser) -> list[list[Any]]:
    """Column-oriented data for ``usage_events`` in :data:`COLUMNS` order, one row per event."""
    tenant: list[str] = []
    project: list[str] = []
    received: list[int] = []
    partition: list[int] = []
    offset: list[int] = []
    src_partition: list[int] = []
    src_offset: list[int] = []
    events: list[dict[str, Any]] = []
    for record in records:
        env = record.envelope
        evs = env["events"]
        n = len(evs)
        events.extend(evs)
        tenant.extend([env["tenant"]] * n)
        project.extend([env["project"]] * n)
        received.extend([parse_ts(env["received_at"])] * n)
        partition.extend([record.partition] * n)
        offset.extend([record.offset] * n)
        src_partition.extend([env["src"]["partition"]] * n)
        src_offset.extend([env["src"]["offset"]] * n)

    def text(key: str, default: str = "") -> list[str]:
        return [e.get(key) or default for e in events]

    def count(key: str) -> list[int]:
        return [e.get(key) or 0 for e in events]

    costs = [e.get("cost") or {} for e in events]
    return [
        tenant,
        project,
        text("agent", "default"),
        text("user"),
        text("session_id"),
        text("operation"),
        [e.get("tags") or {} for e in events],
        text("provider"),
        text("model"),
        *(count(f) for f in TOKEN_FIELDS),
        count("cost_nanos"),
        *([c.get(k, 0) for c in costs] for k in _COST_KEYS),
        text("price_id"),
        text("pricing_status"),
        text("price_source"),
        text("status", "ok"),
        [e.get("latency_ms") for e in events],
        text("event_id"),
        [parse_ts(e["timestamp"]) for e in events],
        received,
        partition,
        offset,
        src_partition,
        src_offset,
    ]
