"""Sink core: decoding, the src watermark filter, insert planning with dedupe tokens, columns."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS, priced_envelope, raw_envelope
from stream_processors.sink.logic import (
    COLUMNS,
    BadRecord,
    PricedRecord,
    TimestampParser,
    Watermarks,
    decode_priced,
    dedupe_token,
    plan_inserts,
    to_columns,
)

TOPIC = "spendstream.usage.priced"
parse = TimestampParser()


def priced_event(event_id: str, **extra) -> dict:
    ev = {
        "event_id": event_id,
        "timestamp": "2025-03-01T12:00:00.250Z",
        "project": "p1",
        "agent": "a1",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cost": dict.fromkeys(COST_CLASSES, 0) | {"input": 3000, "output": 4000},
        "cost_nanos": 7000,
        "price_id": "openai/gpt-4o@base",
        "pricing_status": "priced",
        "price_source": "catalog",
    }
    ev.update(extra)
    return ev


def rec(offset: int, src_offset: int, n_events: int = 1, partition: int = 0, src_partition: int | None = None,
        ts_ms: int = 1_000) -> PricedRecord:  # fmt: skip
    raw = raw_envelope("t1", "p1", "2025-03-01T12:00:01.000Z", [])
    events = [priced_event(f"e{src_offset}-{i}") for i in range(n_events)]
    src_p = partition if src_partition is None else src_partition
    return PricedRecord(partition, offset, ts_ms, priced_envelope(raw, src_p, src_offset, events))


# ---------------------------------------------------------------- decode


def test_decode_keeps_the_position_and_envelope():
    r = rec(7, 3, n_events=2)
    decoded = decode_priced(1, 7, 99, orjson.dumps(r.envelope), parse)
    assert (decoded.partition, decoded.offset, decoded.timestamp_ms) == (1, 7, 99)
    assert (decoded.src_partition, decoded.src_offset, decoded.rows) == (0, 3, 2)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: b"{bad json",
        lambda e: orjson.dumps([e]),
        lambda e: orjson.dumps(e | {"v": 9}),
        lambda e: orjson.dumps(e | {"src": {"partition": 0}}),
        lambda e: orjson.dumps(e | {"src": {"partition": -1, "offset": 2}}),
        lambda e: orjson.dumps(e | {"tenant": None}),
        lambda e: orjson.dumps(e | {"events": [1]}),
        lambda e: orjson.dumps(e | {"events": [{k: v for k, v in e["events"][0].items() if k != "timestamp"}]}),
        lambda e: orjson.dumps(e | {"events": [e["events"][0] | {"timestamp": "yesterday"}]}),
        lambda e: None,
    ],
)
def test_decode_rejects_what_is_not_a_priced_envelope(mutate):
    with pytest.raises(BadRecord):
        decode_priced(0, 0, 0, mutate(rec(0, 0).envelope), parse)


# ---------------------------------------------------------------- watermark filter


def test_records_at_or_below_the_watermark_are_replays():
    marks = Watermarks({0: 10})
    records = [rec(0, 9), rec(1, 10), rec(2, 11), rec(3, 11), rec(4, 12), rec(5, 4, src_partition=1)]
    new, replays = marks.split_new(records)
    assert [r.offset for r in new] == [2, 4, 5]
    assert [r.offset for r in replays] == [0, 1, 3]  # 3 repeats src offset 11 within the batch
    # split_new does not advance: a failed insert must not move the watermark
    assert marks.get(0) == 10 and marks.get(1) is None
    marks.advance(new)
    assert marks.as_dict() == {0: 12, 1: 4}


def test_pricing_replay_sequence_stores_each_src_record_once():
    # the pricing stage crashed after emitting src 100..102 and re-emitted 100..104
    marks = Watermarks()
    stream = [rec(i, s) for i, s in enumerate([100, 101, 102, 100, 101, 102, 103, 104])]
    stored = []
    for i in range(0, len(stream), 3):  # three flushes
        new, _ = marks.split_new(stream[i : i + 3])
        marks.advance(new)
        stored += [r.src_offset for r in new]
    assert stored == [100, 101, 102, 103, 104]


def test_seed_overrides_the_partitions_read_from_clickhouse():
    marks = Watermarks({0: 5, 1: 7})
    marks.seed({1: 20})
    assert marks.as_dict() == {0: 5, 1: 20}


# ---------------------------------------------------------------- insert planning


def test_an_insert_spans_partitions_and_its_token_names_each_offset_range():
    records = [rec(10, 1, partition=1), rec(5, 1, partition=0), rec(11, 2, partition=1), rec(6, 2, partition=0)]
    (insert,) = plan_inserts(TOPIC, records, max_rows=100)
    assert insert.records == records  # arrival order: each partition stays in offset order
    assert insert.token == f"{TOPIC}:0:5-6@1000,1:10-11@1000"


def test_inserts_are_cut_at_record_boundaries_and_empty_records_skipped():
    records = [rec(0, 0, 3), rec(1, 1, 0), rec(2, 2, 3), rec(3, 3, 5), rec(4, 4, 1)]
    inserts = plan_inserts(TOPIC, records, max_rows=6)
    assert [[r.offset for r in i.records] for i in inserts] == [[0, 2], [3, 4]]
    assert [i.rows for i in inserts] == [6, 6]
    assert [i.token for i in inserts] == [f"{TOPIC}:0:0-2@1000", f"{TOPIC}:0:3-4@1000"]
    # a record larger than the limit stays whole
    assert [i.rows for i in plan_inserts(TOPIC, [rec(0, 0, 9)], max_rows=4)] == [9]


def test_token_is_deterministic_and_tells_apart_logs_that_reuse_offsets():
    a, b = rec(0, 0, ts_ms=1_000), rec(3, 1, ts_ms=1_500)
    assert dedupe_token(TOPIC, [a, b]) == dedupe_token(TOPIC, [a, b]) == f"{TOPIC}:0:0-3@1000"
    # the same offsets after the memory-only broker restarted carry later timestamps
    assert dedupe_token(TOPIC, [rec(0, 0, ts_ms=9_000), b]) != dedupe_token(TOPIC, [a, b])


# ---------------------------------------------------------------- columns


def test_columns_follow_the_column_list_one_row_per_event():
    first = rec(4, 40, n_events=2, partition=2, src_partition=2)
    sparse = {"event_id": "bare", "timestamp": "2025-03-01T12:00:00Z", "provider": "x", "model": "y",
              "cost": {}, "cost_nanos": 0, "pricing_status": "unknown_model", "price_source": "none", "price_id": ""}  # fmt: skip
    second = PricedRecord(2, 5, 0, first.envelope | {"src": {"partition": 2, "offset": 41}, "events": [sparse]})
    columns = to_columns([first, second], parse)
    assert len(columns) == len(COLUMNS)
    assert all(len(c) == 3 for c in columns)
    row = {name: col[0] for name, col in zip(COLUMNS, columns)}
    assert (row["tenant"], row["project"], row["agent"], row["event_id"]) == ("t1", "p1", "a1", "e40-0")
    assert (row["input_tokens"], row["cost_nanos"], row["cost_input_nanos"], row["cost_output_nanos"]) == (1200, 7000, 3000, 4000)
    assert row["timestamp"] == ms("2025-03-01T12:00:00.250+00:00")
    assert row["received_at"] == ms("2025-03-01T12:00:01+00:00")
    assert (row["partition"], row["offset"], row["src_partition"], row["src_offset"]) == (2, 4, 2, 40)
    bare = {name: col[2] for name, col in zip(COLUMNS, columns)}
    # absent attribution and counts get the table's neutral values
    assert (bare["agent"], bare["user"], bare["status"], bare["latency_ms"], bare["tags"]) == ("default", "", "ok", None, {})
    assert all(bare[f] == 0 for f in TOKEN_FIELDS)
    assert all(bare[f"cost_{c}_nanos"] == 0 for c in COST_CLASSES)
    assert (bare["offset"], bare["src_offset"]) == (5, 41)


def ms(iso: str) -> int:
    instant = datetime.fromisoformat(iso)
    return int(instant.timestamp()) * 1000 + instant.microsecond // 1000


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)))
def test_timestamp_fast_path_is_exact(instant):
    instant = instant.replace(tzinfo=timezone.utc)
    text = instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond // 1000:03d}Z"
    expected = (int(instant.replace(microsecond=0).timestamp())) * 1000 + instant.microsecond // 1000
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2025-03-01T14:00:00.5+02:00", "2025-03-01T12:00:00.500+00:00"),
        ("2025-03-01T12:00:00Z", "2025-03-01T12:00:00+00:00"),
        ("2025-03-01T12:00:00.123456Z", "2025-03-01T12:00:00.123+00:00"),
    ],
)
def test_timestamp_other_rfc3339_forms(text, iso):
    assert parse(text) == ms(iso)
