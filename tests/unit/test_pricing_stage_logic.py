"""Pricing stage core: one priced record per raw record, dedupe with the replay rule, DLQ, chunks."""

from __future__ import annotations

import base64

import orjson
import pytest

from spendstream.contracts import raw_envelope, record_key
from spendstream.pricing import OverrideBook, default_catalog, price
from stream_processors.pricing.dedupe import MAX_IDS_PER_CHUNK, DedupeIndex, decode_chunk
from stream_processors.pricing.logic import BatchResult, PricingStage, RawRecord

RAW = "spendstream.usage.raw"
HOUR_MS = 3_600_000
WINDOW_MS = 48 * HOUR_MS
NOW = 1_750_000_000_000


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


def new_stage(catalog) -> PricingStage:
    return PricingStage(catalog, RAW, WINDOW_MS)


def event(event_id: str, **overrides) -> dict:
    ev = {
        "event_id": event_id,
        "timestamp": "2025-03-01T12:00:00.000Z",
        "project": "p1",
        "agent": "a1",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cache_read_tokens": 200,
    }
    ev.update(overrides)
    return ev


def record(offset: int, events: list[dict], partition: int = 0, tenant: str = "t1", project: str = "p1") -> RawRecord:
    value = orjson.dumps(raw_envelope(tenant, project, "2025-03-01T12:00:01.000Z", events))
    return RawRecord(partition, offset, record_key(tenant, project), value)


def priced_ids(result: BatchResult) -> list[list[str]]:
    return [[e["event_id"] for e in orjson.loads(o.value)["events"]] for o in result.priced]


def test_one_priced_record_per_raw_record_with_src_and_key(catalog):
    stage = new_stage(catalog)
    records = [record(10, [event("a"), event("b")]), record(11, [event("c")], partition=0, project="p2")]
    result = stage.process(records, NOW)
    assert [o.partition for o in result.priced] == [0, 0]
    assert [o.key for o in result.priced] == [b"t1/p1", b"t1/p2"]
    envelopes = [orjson.loads(o.value) for o in result.priced]
    assert [e["src"] for e in envelopes] == [{"partition": 0, "offset": 10}, {"partition": 0, "offset": 11}]
    assert [e["project"] for e in envelopes] == ["p1", "p2"]
    assert envelopes[0]["received_at"] == "2025-03-01T12:00:01.000Z"
    assert priced_ids(result) == [["a", "b"], ["c"]]
    assert (result.events_in, result.events_priced, result.duplicates) == (3, 3, 0)


def test_each_event_carries_the_pricing_of_the_pure_core(catalog):
    stage = new_stage(catalog)
    ev = event("a", model="claude-3-5-sonnet-20241022", provider="anthropic", cache_write_tokens=100)
    out = orjson.loads(stage.process([record(0, [ev])], NOW).priced[0].value)["events"][0]
    line = price(ev, catalog)
    assert out["cost_nanos"] == line.cost_nanos > 0
    assert out["cost"] == line.cost
    assert (out["price_id"], out["pricing_status"], out["price_source"]) == (line.price_id, "priced", "catalog")
    # the normalised fields pass through untouched
    assert {k: out[k] for k in ev} == ev


def test_duplicates_inside_a_record_a_batch_and_across_batches_are_dropped(catalog):
    stage = new_stage(catalog)
    first = stage.process([record(0, [event("a"), event("a"), event("b")]), record(1, [event("b"), event("c")])], NOW)
    assert priced_ids(first) == [["a", "b"], ["c"]]
    assert first.duplicates == 2
    later = stage.process([record(2, [event("a"), event("d")])], NOW)
    assert priced_ids(later) == [["d"]]
    assert later.duplicates == 1


def test_dedupe_scope_is_tenant_and_project(catalog):
    stage = new_stage(catalog)
    result = stage.process(
        [record(0, [event("a")]), record(1, [event("a")], tenant="t2"), record(2, [event("a")], project="p2")], NOW
    )
    assert priced_ids(result) == [["a"], ["a"], ["a"]]


def test_replay_of_the_same_record_is_priced_again_byte_identical(catalog):
    stage = new_stage(catalog)
    records = [record(5, [event("a"), event("a"), event("b")]), record(6, [event("b"), event("c")])]
    first = stage.process(records, NOW)
    again = stage.process(records, NOW + 1000)  # redelivered after a crash: same positions
    assert [o.value for o in again.priced] == [o.value for o in first.priced]
    assert again.replayed == 3 and again.events_priced == 3
    # the replay adds no dedupe state
    assert again.chunk_writes == []
    # the same ids at another position are duplicates
    moved = stage.process([record(7, [event("a"), event("c")])], NOW)
    assert priced_ids(moved) == [[]]


def test_replay_after_restart_from_persisted_chunks(catalog):
    stage = new_stage(catalog)
    batch = [record(0, [event("a"), event("b")]), record(1, [event("a"), event("c")])]
    first = stage.process(batch, NOW)
    table = {key: value for _, key, value in first.chunk_writes}

    restarted = new_stage(catalog)
    restarted.index.rebuild(table.items())
    assert len(restarted.index) == 3
    replay = restarted.process(batch, NOW + 5000)
    assert [o.value for o in replay.priced] == [o.value for o in first.priced]
    retry = restarted.process([record(2, [event("b"), event("d")])], NOW)
    assert priced_ids(retry) == [["d"]]


def test_replay_when_the_chunks_never_reached_the_changelog(catalog):
    # crash after the priced records were sent but before Faust flushed the changelog
    batch = [record(0, [event("a"), event("b")]), record(1, [event("a"), event("c")])]
    first = new_stage(catalog).process(batch, NOW)
    replay = new_stage(catalog).process(batch, NOW)
    assert [o.value for o in replay.priced] == [o.value for o in first.priced]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({"v": 2, "tenant": "t", "project": "p", "received_at": "x", "events": []}), "version"),
        (orjson.dumps({"v": 1, "project": "p", "received_at": "x", "events": []}), "tenant"),
        (orjson.dumps({"v": 1, "tenant": "t", "project": "p", "received_at": "x", "events": {}}), "events"),
        (None, "empty"),
    ],
)
def test_unparseable_records_go_to_the_dlq_with_their_bytes(catalog, value, reason):
    stage = new_stage(catalog)
    result = stage.process([RawRecord(3, 42, b"k", value), record(43, [event("a")], partition=3)], NOW)
    assert len(result.dlq) == 1 and len(result.priced) == 1
    dead = orjson.loads(result.dlq[0].value)
    assert dead["stage"] == "pricing" and reason in dead["reason"]
    assert dead["src"] == {"topic": RAW, "partition": 3, "offset": 42}
    assert base64.b64decode(dead["value_b64"]) == (value or b"")
    assert (result.dlq[0].partition, result.dlq[0].key) == (3, b"k")
    assert orjson.loads(result.priced[0].value)["src"] == {"partition": 3, "offset": 43}


def test_invalid_events_are_dead_lettered_and_not_remembered(catalog):
    stage = new_stage(catalog)
    bad_tokens = event("x", cache_read_tokens=5000)  # part larger than its whole
    result = stage.process([record(0, [event("a"), bad_tokens, {"no": "id"}, "scalar"])], NOW)
    assert priced_ids(result) == [["a"]]
    assert result.rejected_events == 3
    dead = orjson.loads(result.dlq[0].value)
    assert dead["src"]["offset"] == 0 and "value_b64" not in dead
    assert [e["event"] for e in dead["events"]] == [bad_tokens, {"no": "id"}, "scalar"]
    assert "fit their parents" in dead["events"][0]["reason"]
    # the client fixes the event and retries with the same id: it is new, not a duplicate
    fixed = stage.process([record(1, [event("x")])], NOW)
    assert priced_ids(fixed) == [["x"]]


def test_unknown_model_is_kept_at_zero_cost_and_counted(catalog):
    stage = new_stage(catalog)
    result = stage.process([record(0, [event("a", provider="acme", model="no-such-model")])], NOW)
    out = orjson.loads(result.priced[0].value)["events"][0]
    assert (out["pricing_status"], out["cost_nanos"], out["price_source"]) == ("unknown_model", 0, "none")
    assert result.unknown_model == 1


def test_tenant_overrides_apply_only_to_their_tenant(catalog):
    stage = new_stage(catalog)
    stage.overrides = OverrideBook.from_rows(
        [{"id": "o1", "tenant": "t1", "provider": "openai", "model": "gpt-4o",
          "effective_from": "2025-01-01T00:00:00Z", "input_mtok": "1", "output_mtok": "2"}],
        catalog,
    )  # fmt: skip
    result = stage.process([record(0, [event("a")]), record(1, [event("a")], tenant="t2")], NOW)
    mine, theirs = (orjson.loads(o.value)["events"][0] for o in result.priced)
    assert (mine["price_source"], mine["price_id"]) == ("override", "override:o1")
    # 1000 plain input + 200 cache read at $1/Mtok (cache read falls back to input), 300 output at $2/Mtok
    assert mine["cost_nanos"] == 1200 * 1000 + 300 * 2000
    assert theirs["price_source"] == "catalog"


def test_chunks_hold_first_positions_and_split_large_batches(catalog):
    index = DedupeIndex(WINDOW_MS)
    ids = [f"e{i}" for i in range(MAX_IDS_PER_CHUNK + 10)]
    for i, event_id in enumerate(ids):
        index.remember("t/p", event_id, (1, 100 + i // 3000))
    per_record = [(100, "t/p", ids[:3000]), (101, "t/p", ids[3000:])]
    chunks = index.seal(1, per_record, NOW)
    assert len(chunks) == 2 and len({c.key for c in chunks}) == 2
    assert sum(len(part.entries) for c in chunks for part in decode_chunk(c.encode())) == len(ids)
    rebuilt = DedupeIndex(WINDOW_MS)
    rebuilt.rebuild((c.key, c.encode()) for c in chunks)
    assert rebuilt.first_seen("t/p", "e0") == (1, 100)
    assert rebuilt.first_seen("t/p", ids[-1]) == (1, 101)
    assert len(rebuilt) == len(ids)


def test_expired_chunks_are_deleted_and_their_ids_forgotten(catalog):
    stage = new_stage(catalog)
    old = stage.process([record(0, [event("a")], partition=0), record(0, [event("b")], partition=1)], NOW)
    assert {p for p, _, v in old.chunk_writes if v is not None} == {0, 1}
    later = NOW + WINDOW_MS + 1
    # only the partitions this worker owns are cleaned up
    result = stage.process([record(1, [event("c")], partition=0)], later, partitions={0})
    deletions = [(p, k) for p, k, v in result.chunk_writes if v is None]
    assert [p for p, _ in deletions] == [0]
    assert stage.index.first_seen("t1/p1", "a") is None
    assert stage.index.first_seen("t1/p1", "b") == (1, 0)
    # once the window has passed, the id counts as new again
    assert priced_ids(stage.process([record(2, [event("a")], partition=0)], later, partitions={0})) == [["a"]]
