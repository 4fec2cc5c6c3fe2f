"""Pricing stage core: usage.raw records -> usage.priced records, deduplicated. Pure: no IO.

Per raw record (an envelope of one tenant/project's events, see spendstream/contracts.py):
- unusable as a whole (not JSON, not a v1 envelope) -> one DLQ record with the original bytes;
- otherwise exactly ONE priced record (``priced_envelope``, ``src`` = the raw position), holding
  its events minus duplicates, each priced; events that break contract v1 (no event_id, pricing
  refuses them) go to one DLQ record listing them with their reasons.

Dedupe by (tenant/project, event_id) -- the record key is the dedupe scope, so a scope lives in
one partition -- within ``dedupe_window_hours``. The index maps each id to the raw position
(partition, offset) where it was first seen:
- not in the index: new; priced, and remembered at this position;
- first seen at THIS record's position: the same record delivered again after a crash (its
  offset was not committed): priced again, so the output is byte-identical to the first time and
  downstream drops it by the src watermark;
- first seen at another position, or earlier in this record: a duplicate; dropped.

State is persisted per batch, not per event: each batch yields "chunks" (the ids a batch first
saw in one partition, with their positions) for a Faust table, and the index is rebuilt from the
chunks after a restart or rebalance. A chunk expires once older than the window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from spendstream.contracts import SCHEMA_VERSION, dlq_envelope, priced_envelope, priced_headers
from spendstream.pricing import Catalog, OverrideBook, PricingError, price

STAGE = "pricing"
#: ids per chunk: keeps one changelog record well below the producer's 1 MB request limit
#: (event ids are at most 128 characters)
MAX_IDS_PER_CHUNK = 4_000

Position = tuple[int, int]  # (raw partition, raw offset)


@dataclass(frozen=True, slots=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Output:
    """A record to produce: to ``partition`` of the priced or the DLQ topic."""

    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class BatchResult:
    priced: list[Output] = field(default_factory=list)
    dlq: list[Output] = field(default_factory=list)
    #: changelog writes: (partition, chunk key, chunk value or None to delete)
    chunk_writes: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    events_in: int = 0
    events_priced: int = 0
    duplicates: int = 0
    replayed: int = 0
    unknown_model: int = 0
    rejected_events: int = 0


class BadEnvelope(ValueError):
    """The raw value is not a usable v1 envelope; the message is the DLQ reason."""


def decode_raw(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise BadEnvelope("empty value")
    try:
        env = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadEnvelope(f"not JSON: {exc}") from None
    if not isinstance(env, dict):
        raise BadEnvelope("not a JSON object")
    if env.get("v") != SCHEMA_VERSION:
        raise BadEnvelope(f"unsupported envelope version {env.get('v')!r}")
    for key in ("tenant", "project", "received_at"):
        if not isinstance(env.get(key), str) or not env[key]:
            raise BadEnvelope(f"missing or invalid {key}")
    if not isinstance(env.get("events"), list):
        raise BadEnvelope("events is not a list")
    return env


# ---------------------------------------------------------------- dedupe state


@dataclass(slots=True)
class Chunk:
    """Ids first seen by one batch in one raw partition (the unit of persisted dedupe state)."""

    partition: int
    first_seen_ms: int
    #: (raw offset, scope, [event ids first seen in that record])
    records: list[tuple[int, str, list[str]]]

    @property
    def key(self) -> bytes:
        # An id is new at most once per record, so (partition, offset, first id) is unique even
        # when a huge record's ids are split over several chunks or a replay finishes a record.
        offset, _, ids = self.records[0]
        return f"{self.partition}:{offset}:{ids[0]}".encode()

    def encode(self) -> bytes:
        return orjson.dumps({"partition": self.partition, "first_seen_ms": self.first_seen_ms, "records": self.records})

    @classmethod
    def decode(cls, value: bytes) -> Chunk:
        d = orjson.loads(value)
        return cls(d["partition"], d["first_seen_ms"], [(o, s, ids) for o, s, ids in d["records"]])


class DedupeIndex:
    """(scope, event_id) -> first-seen raw position, with the chunks that persist it."""

    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self._first_seen: dict[tuple[str, str], Position] = {}
        #: chunk key -> chunk, oldest first (insertion order)
        self._chunks: dict[bytes, Chunk] = {}

    def __len__(self) -> int:
        return len(self._first_seen)

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    def rebuild(self, stored: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the state with the chunks stored in the table (after recovery)."""
        chunks = sorted((Chunk.decode(v) for _, v in stored), key=lambda c: c.first_seen_ms)
        self._first_seen.clear()
        self._chunks.clear()
        for chunk in chunks:
            self._add(chunk)

    def _add(self, chunk: Chunk) -> None:
        self._chunks[chunk.key] = chunk
        first_seen = self._first_seen
        p = chunk.partition
        for offset, scope, ids in chunk.records:
            for event_id in ids:
                first_seen.setdefault((scope, event_id), (p, offset))

    def first_seen(self, scope: str, event_id: str) -> Position | None:
        return self._first_seen.get((scope, event_id))

    def remember(self, scope: str, event_id: str, position: Position) -> None:
        self._first_seen[(scope, event_id)] = position

    def seal(self, partition: int, records: list[tuple[int, str, list[str]]], now_ms: int) -> list[Chunk]:
        """Turn the ids a batch first saw in ``partition`` into chunks (already in the index)."""
        chunks: list[Chunk] = []
        current: list[tuple[int, str, list[str]]] = []
        size = 0
        for offset, scope, ids in records:
            for start in range(0, len(ids), MAX_IDS_PER_CHUNK):
                part = ids[start : start + MAX_IDS_PER_CHUNK]
                if current and size + len(part) > MAX_IDS_PER_CHUNK:
                    chunks.append(Chunk(partition, now_ms, current))
                    current, size = [], 0
                current.append((offset, scope, part))
                size += len(part)
        if current:
            chunks.append(Chunk(partition, now_ms, current))
        for chunk in chunks:
            self._chunks[chunk.key] = chunk
        return chunks

    def expire(self, now_ms: int, partitions: set[int] | None = None) -> list[Chunk]:
        """Forget chunks older than the window (only of ``partitions`` when given)."""
        cutoff = now_ms - self.window_ms
        expired = [
            c for c in self._chunks.values()
            if c.first_seen_ms < cutoff and (partitions is None or c.partition in partitions)
        ]  # fmt: skip
        for chunk in expired:
            del self._chunks[chunk.key]
            position_of = self._first_seen
            for offset, scope, ids in chunk.records:
                for event_id in ids:
                    if position_of.get((scope, event_id)) == (chunk.partition, offset):
                        del position_of[(scope, event_id)]
        return expired


# ---------------------------------------------------------------- a batch


class PricingStage:
    """The stage's state (dedupe index, catalog, current overrides) and its batch function."""

    def __init__(self, catalog: Catalog, raw_topic: str, dedupe_window_ms: int):
        self.catalog = catalog
        self.raw_topic = raw_topic
        self.index = DedupeIndex(dedupe_window_ms)
        self.overrides = OverrideBook.from_rows([], catalog)

    def process(self, records: list[RawRecord], now_ms: int, partitions: set[int] | None = None) -> BatchResult:
        """Price one batch in order. ``partitions``: the raw partitions this worker owns, whose
        expired chunks it deletes."""
        result = BatchResult()
        new_ids: dict[int, list[tuple[int, str, list[str]]]] = {}
        dumps = orjson.dumps
        for record in records:
            try:
                env = decode_raw(record.value)
            except BadEnvelope as exc:
                envelope = dlq_envelope(
                    STAGE, str(exc), self.raw_topic, record.partition, record.offset, value=record.value
                )
                result.dlq.append(Output(record.partition, record.key, dumps(envelope)))
                continue
            events, rejected, first_seen_here = self._price_record(env, record, result)
            key = record.key or f"{env['tenant']}/{env['project']}".encode()
            value = dumps(priced_envelope(env, record.partition, record.offset, events))
            headers = priced_headers(record.partition, record.offset, len(events))
            result.priced.append(Output(record.partition, key, value, headers))
            if rejected:
                reason = f"{len(rejected)} event(s) rejected"
                envelope = dlq_envelope(STAGE, reason, self.raw_topic, record.partition, record.offset, events=rejected)
                result.dlq.append(Output(record.partition, key, dumps(envelope)))
            if first_seen_here:
                scope = f"{env['tenant']}/{env['project']}"
                new_ids.setdefault(record.partition, []).append((record.offset, scope, first_seen_here))
        for chunk in self.index.expire(now_ms, partitions):
            result.chunk_writes.append((chunk.partition, chunk.key, None))
        for partition, seen in new_ids.items():
            for chunk in self.index.seal(partition, seen, now_ms):
                result.chunk_writes.append((partition, chunk.key, chunk.encode()))
        return result

    def _price_record(
        self, env: dict[str, Any], record: RawRecord, result: BatchResult
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        scope = f"{env['tenant']}/{env['project']}"
        position = (record.partition, record.offset)
        overrides = self.overrides.for_tenant(env["tenant"])
        catalog = self.catalog
        index = self.index
        in_record: set[str] = set()
        priced: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        first_seen_here: list[str] = []
        duplicates = replayed = unknown = 0
        for event in env["events"]:
            if not isinstance(event, dict):
                rejected.append({"reason": "event is not a JSON object", "event": event})
                continue
            event_id = event.get("event_id")
            if not isinstance(event_id, str) or not event_id:
                rejected.append({"reason": "event_id is required", "event": event})
                continue
            if event_id in in_record:
                duplicates += 1
                continue
            seen = index.first_seen(scope, event_id)
            if seen is not None and seen != position:
                duplicates += 1
                continue
            try:
                line = price(event, catalog, overrides)
            except PricingError as exc:
                rejected.append({"reason": str(exc), "event": event})
                continue
            in_record.add(event_id)
            if seen is None:
                index.remember(scope, event_id, position)
                first_seen_here.append(event_id)
            else:
                replayed += 1
            if line.pricing_status == "unknown_model":
                unknown += 1
            priced.append({**event, **line.event_fields()})
        result.events_in += len(env["events"])
        result.events_priced += len(priced)
        result.duplicates += duplicates
        result.replayed += replayed
        result.unknown_model += unknown
        result.rejected_events += len(rejected)
        return priced, rejected, first_seen_here
