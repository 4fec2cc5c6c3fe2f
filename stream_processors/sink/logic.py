"""Sink core: usage.priced records -> rows of ``usage_events_in`` (JSONEachRow). Pure: no Kafka/ClickHouse imports.

ClickHouse parses the events: each priced record becomes ONE JSONEachRow line, its value with its
Kafka partition and offset spliced in front (:func:`json_rows`), inserted into ``usage_events_in``,
whose materialized view ARRAY JOINs the events into usage_events (clickhouse/schema/0007_*.sql).
So the sink never parses what the pricing stage wrote: the record's headers carry ``src`` and the
event count (:func:`read_priced`; spendstream/contracts.py). A record without them (an older or a
foreign producer) is parsed and checked in full (:func:`decode_priced`).

A flush takes the records consumed since the last one and
1. drops records already stored (:class:`Watermarks`): a record whose ``src.offset`` is not above
   the highest one stored for its ``src.partition`` is a replay, either of a pricing-stage record
   re-priced after a crash (see spendstream/contracts.py) or of one this sink stored before it
   crashed and had not committed yet,
2. cuts the rest into inserts (:func:`plan_inserts`) at record boundaries, at most ``max_rows``
   rows each, every one carrying an ``insert_deduplication_token`` derived from the offset ranges
   it holds, so an insert retried after an error is a no-op in ClickHouse,
3. turns each insert into its JSONEachRow body (:func:`json_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from spendstream.contracts import (
    PRICED_EVENTS_HEADER,
    PRICED_SRC_OFFSET_HEADER,
    PRICED_SRC_PARTITION_HEADER,
    SCHEMA_VERSION,
)
from spendstream.timeutil import TimestampParser

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class BadRecord(ValueError):
    """A usage.priced value that is not a v1 priced envelope; the message says why."""


@dataclass(frozen=True, slots=True)
class PricedRecord:
    """One usage.priced record: where it was read, where it was priced from, and its value."""

    partition: int
    offset: int
    #: the record's Kafka timestamp in ms; part of the dedupe token (see :func:`dedupe_token`)
    timestamp_ms: int
    src_partition: int
    src_offset: int
    #: events in the envelope
    rows: int
    #: the envelope's JSON as the pricing stage wrote it
    value: bytes


def read_priced(
    partition: int,
    offset: int,
    timestamp_ms: int,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
    parse_ts: TimestampParser,
) -> PricedRecord:
    """The record, taking ``src`` and the event count from its headers when it has them (the value
    is then trusted as the pricing stage's; ClickHouse still refuses one it cannot parse, see the
    writer), else from :func:`decode_priced`. Raises :class:`BadRecord` if unusable."""
    found: dict[str, bytes] = {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, raw in pairs:
        if name in _HEADER_NAMES:
            found[name] = raw
    if len(found) == len(_HEADER_NAMES) and value is not None and value[:1] == b"{":
        try:
            src_p, src_o, rows = (int(found[name]) for name in _HEADER_NAMES)
        except ValueError:
            pass
        else:
            if min(src_p, src_o, rows) >= 0:
                return PricedRecord(partition, offset, timestamp_ms, src_p, src_o, rows, value)
    return decode_priced(partition, offset, timestamp_ms, value, parse_ts)


_HEADER_NAMES = (PRICED_SRC_PARTITION_HEADER, PRICED_SRC_OFFSET_HEADER, PRICED_EVENTS_HEADER)


def decode_priced(
    partition: int, offset: int, timestamp_ms: int, value: bytes | None, parse_ts: TimestampParser
) -> PricedRecord:
    """Parse and shape-check one usage.priced value; raise :class:`BadRecord` if unusable.

    Field types inside events are the pricing stage's promise and are not re-checked here; an
    insert ClickHouse refuses as data is split record by record (see the agent). Costs are, since
    ClickHouse does not refuse those: it reads a JSON integer past Int64 modulo 2**64 (2**63
    becomes -2**63, silently). Pricing-stage records never hold one (per-event cap,
    spendstream/money.py); one without headers may come from elsewhere."""
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
    for event in events:
        cost = event.get("cost")
        amounts = [event.get("cost_nanos"), *(cost.values() if isinstance(cost, dict) else ())]
        if any(type(a) is int and not INT64_MIN <= a <= INT64_MAX for a in amounts):
            raise BadRecord(f"event {str(event.get('event_id'))[:128]!r}: a cost beyond Int64 nano-USD")
    # json_rows splices after the opening brace: no whitespace before it
    value = value if value[:1] == b"{" else value.strip()
    return PricedRecord(partition, offset, timestamp_ms, src["partition"], src["offset"], len(events), value)


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def json_rows(records: list[PricedRecord], head: bytes = b"") -> bytes:
    """The JSONEachRow body of an insert into ``usage_events_in``: per record one line, its value
    with ``"partition":P,"offset":O,`` spliced in after the opening brace; after ``head`` (the
    statement, when it travels in the body: one copy of the whole body less)."""
    parts: list[bytes | memoryview] = [head]
    for record in records:
        parts.append(b'{"partition":%d,"offset":%d,' % (record.partition, record.offset))
        parts.append(memoryview(record.value)[1:])
        parts.append(b"\n")
    return b"".join(parts)


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
