"""Pricing stage core: usage.raw records -> usage.priced records, deduplicated. Pure: no IO.

Per raw record (an envelope of one tenant/project's events, see spendstream/contracts.py):
- unusable as a whole (not JSON, not a v1 envelope) -> one DLQ record with the original bytes;
- otherwise exactly ONE priced record (``priced_envelope``, ``src`` = the raw position), holding
  its events minus duplicates, each priced; events that break contract v1 (no event_id, pricing
  refuses them: token counts above ``MAX_TOKENS_PER_EVENT``, a ``cost_usd`` above the per-event
  cap, ...) go to one DLQ record listing them with their reasons; so does an event pricing fails
  on unexpectedly (reason ``pricing failed: ...``): one event's content never stops the stage;
- a priced record that cannot be written (orjson cannot encode it, or it exceeds the producer's
  ``max_record_bytes``) is not written: the raw record goes to the DLQ with the reason instead,
  and its event ids are not remembered, so a client's retry of them is priced.
Every DLQ record is counted by reason in ``BatchResult.poison``.

Cost cap (spendstream/pricing/logic.py): an event whose catalog or override price exceeds
``MAX_EVENT_COST_NANOS`` (1,000,000 USD) is written with ``pricing_status='cost_over_cap'`` and
cost 0, like an unknown model: it stays visible (usage counts it as unpriced, the stage counts it
in ``spendstream_pricing_cost_over_cap_events_total``) and no amount beyond the cap ever reaches
budgets, the sink or ClickHouse. A client's ``cost_usd`` above the cap breaks the contract
instead (the gateway refuses it) and is dead-lettered.

Dedupe by (tenant/project, event_id) -- the record key is the dedupe scope, so a scope lives in
one partition -- within ``pricing.dedupe_window_hours``. The index maps each id to the raw position
(partition, offset) where it was first seen:
- not in the index: new; priced, and remembered at this position;
- first seen at THIS record's position: the same record delivered again after a crash (its
  offset was not committed): priced again, so the output is byte-identical to the first time and
  downstream drops it by the src watermark;
- first seen at another position, or earlier in this record: a duplicate; dropped.

The index (``dedupe.DedupeIndex``: 80-bit fingerprints, at most 24 bytes per id) is persisted
per batch, not per event: a batch yields "chunks" (a partition's new ids with their positions)
for a Faust table, and the index is rebuilt from the chunks after a restart or rebalance. A
chunk expires once its newest id is older than the window.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from spendstream.contracts import SCHEMA_VERSION, dlq_envelope, priced_envelope, priced_headers
from spendstream.pricing import Catalog, OverrideBook, PricingError, price
from spendstream.pricing.logic import COST_OVER_CAP
from stream_processors.pricing.dedupe import DedupeIndex

STAGE = "pricing"


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
    cost_over_cap: int = 0
    rejected_events: int = 0
    #: DLQ records by reason: bad_envelope, invalid_events, unencodable, too_large
    poison: Counter[str] = field(default_factory=Counter)


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


# ---------------------------------------------------------------- a batch


class PricedEvents(NamedTuple):
    """One raw record's events as ``_price_record`` leaves them; nothing of it is applied to the
    batch's result or the dedupe index until its priced record could be encoded."""

    events: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    #: ids new in the index at this record's position
    first_seen_here: list[str]
    duplicates: int
    replayed: int
    unknown_model: int
    cost_over_cap: int


class PricingStage:
    """The stage's state (dedupe index, catalog, current overrides) and its batch function."""

    def __init__(self, catalog: Catalog, raw_topic: str, dedupe_window_ms: int, max_record_bytes: int | None = None):
        self.catalog = catalog
        self.raw_topic = raw_topic
        self.index = DedupeIndex(dedupe_window_ms)
        self.overrides = OverrideBook.from_rows([], catalog)
        #: the largest priced value the producer takes (None: no limit)
        self.max_record_bytes = max_record_bytes

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
                self._dead_letter(result, record, record.key, "bad_envelope", str(exc))
                continue
            scope = f"{env['tenant']}/{env['project']}"
            key = record.key or scope.encode()
            priced = self._price_record(env, scope, record)
            try:
                value = dumps(priced_envelope(env, record.partition, record.offset, priced.events))
            except orjson.JSONEncodeError as exc:
                self._dead_letter(result, record, key, "unencodable", f"the priced record cannot be encoded: {exc}")
                continue
            if self.max_record_bytes is not None and len(value) > self.max_record_bytes:
                reason = f"the priced record would be {len(value)} bytes, more than the {self.max_record_bytes} allowed"
                self._dead_letter(result, record, key, "too_large", reason)
                continue
            headers = priced_headers(record.partition, record.offset, len(priced.events))
            result.priced.append(Output(record.partition, key, value, headers))
            if priced.rejected:
                reason = f"{len(priced.rejected)} event(s) rejected"
                envelope = dlq_envelope(
                    STAGE, reason, self.raw_topic, record.partition, record.offset, events=priced.rejected
                )
                result.dlq.append(Output(record.partition, key, dumps(envelope)))
                result.poison["invalid_events"] += 1
            if priced.first_seen_here:
                position = (record.partition, record.offset)
                for event_id in priced.first_seen_here:
                    self.index.remember(scope, event_id, position)
                new_ids.setdefault(record.partition, []).append((record.offset, scope, priced.first_seen_here))
            result.events_in += len(env["events"])
            result.events_priced += len(priced.events)
            result.duplicates += priced.duplicates
            result.replayed += priced.replayed
            result.unknown_model += priced.unknown_model
            result.cost_over_cap += priced.cost_over_cap
            result.rejected_events += len(priced.rejected)
        for chunk in self.index.expire(now_ms, partitions):
            result.chunk_writes.append((chunk.partition, chunk.key, None))
        for partition, seen in new_ids.items():
            for chunk in self.index.seal(partition, seen, now_ms):
                result.chunk_writes.append((partition, chunk.key, chunk.encode()))
        return result

    def _dead_letter(self, result: BatchResult, record: RawRecord, key: bytes | None, label: str, reason: str) -> None:
        """The whole raw record to the DLQ, its original bytes with the reason."""
        envelope = dlq_envelope(STAGE, reason, self.raw_topic, record.partition, record.offset, value=record.value)
        result.dlq.append(Output(record.partition, key, orjson.dumps(envelope)))
        result.poison[label] += 1

    def _price_record(self, env: dict[str, Any], scope: str, record: RawRecord) -> PricedEvents:
        position = (record.partition, record.offset)
        overrides = self.overrides.for_tenant(env["tenant"])
        catalog = self.catalog
        index = self.index
        in_record: set[str] = set()
        priced: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        first_seen_here: list[str] = []
        duplicates = replayed = unknown = over_cap = 0
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
            except Exception as exc:  # noqa: BLE001 - a content the contract checks missed: dead-letter, go on
                rejected.append({"reason": f"pricing failed: {type(exc).__name__}: {exc}"[:1000], "event": event})
                continue
            in_record.add(event_id)
            if seen is None:
                first_seen_here.append(event_id)
            else:
                replayed += 1
            status = line.pricing_status
            if status == "unknown_model":
                unknown += 1
            elif status == COST_OVER_CAP:
                over_cap += 1
            priced.append({**event, **line.event_fields()})
        return PricedEvents(priced, rejected, first_seen_here, duplicates, replayed, unknown, over_cap)
