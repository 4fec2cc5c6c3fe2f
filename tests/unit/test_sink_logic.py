"""Sink core: reading records (headers or value), the src watermark filter, insert planning with
dedupe tokens, JSONEachRow bodies. What ClickHouse makes of those bodies is tested against the
embedded ClickHouse in tests/integration/test_sink.py."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.contracts import COST_CLASSES, priced_envelope, priced_headers, raw_envelope
from spendstream.timeutil import TimestampParser
from stream_processors.sink.logic import (
    BadRecord,
    PricedRecord,
    Watermarks,
    decode_priced,
    dedupe_token,
    json_rows,
    plan_inserts,
    read_priced,
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


def envelope(src_partition: int, src_offset: int, n_events: int = 1) -> dict:
    raw = raw_envelope("t1", "p1", "2025-03-01T12:00:01.000Z", [])
    events = [priced_event(f"e{src_offset}-{i}") for i in range(n_events)]
    return priced_envelope(raw, src_partition, src_offset, events)


def rec(offset: int, src_offset: int, n_events: int = 1, partition: int = 0, src_partition: int | None = None,
        ts_ms: int = 1_000) -> PricedRecord:  # fmt: skip
    src_p = partition if src_partition is None else src_partition
    value = orjson.dumps(envelope(src_p, src_offset, n_events))
    return PricedRecord(partition, offset, ts_ms, src_p, src_offset, n_events, value)


# ---------------------------------------------------------------- decode


def test_decode_keeps_the_position_and_envelope():
    value = orjson.dumps(envelope(0, 3, n_events=2))
    decoded = decode_priced(1, 7, 99, value, parse)
    assert (decoded.partition, decoded.offset, decoded.timestamp_ms) == (1, 7, 99)
    assert (decoded.src_partition, decoded.src_offset, decoded.rows, decoded.value) == (0, 3, 2, value)


def test_headers_spare_the_parse_and_their_absence_falls_back_to_it():
    value = orjson.dumps(envelope(2, 40, n_events=3))
    headers = priced_headers(2, 40, 3)
    from_headers = read_priced(1, 7, 99, value, headers, parse)
    assert from_headers == PricedRecord(1, 7, 99, 2, 40, 3, value)
    # what Faust hands over may be a mapping; the value is not parsed at all
    assert read_priced(1, 7, 99, b"{trusted}", dict(headers), parse).rows == 3
    assert read_priced(1, 7, 99, value, None, parse) == from_headers
    assert read_priced(1, 7, 99, value, [("other", b"1")], parse) == from_headers
    # headers that do not make sense are ignored, so the value is checked in full
    for broken in ([h if h[0] != headers[1][0] else (h[0], b"x") for h in headers], headers[:2]):
        assert read_priced(1, 7, 99, value, broken, parse) == from_headers
        with pytest.raises(BadRecord):
            read_priced(1, 7, 99, b"not an envelope", broken, parse)
    with pytest.raises(BadRecord):
        read_priced(1, 7, 99, b"not an envelope", headers, parse)


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
        decode_priced(0, 0, 0, mutate(envelope(0, 0)), parse)


@pytest.mark.parametrize(
    "event",
    [
        priced_event("e", cost_nanos=2**63),
        priced_event("e", cost=dict.fromkeys(COST_CLASSES, 0) | {"request": 2**64 - 1}),
    ],
)
def test_decode_refuses_a_cost_clickhouse_would_wrap_silently(event):
    # ClickHouse reads a JSON integer past Int64 modulo 2**64 (2**63 is stored as -2**63), so this
    # is the one value of a headerless record checked before the insert
    value = orjson.dumps(envelope(0, 0) | {"events": [event]})
    with pytest.raises(BadRecord, match="a cost beyond Int64"):
        decode_priced(0, 0, 0, value, parse)
    at_the_edge = orjson.dumps(envelope(0, 0) | {"events": [priced_event("e", cost_nanos=2**63 - 1)]})
    assert decode_priced(0, 0, 0, at_the_edge, parse).rows == 1


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


# ---------------------------------------------------------------- JSONEachRow body


def test_each_record_is_one_line_with_its_kafka_position_spliced_in():
    records = [rec(4, 40, n_events=2, partition=2), rec(5, 41, partition=3)]
    lines = json_rows(records).split(b"\n")
    assert lines[-1] == b""
    rows = [orjson.loads(line) for line in lines[:-1]]
    assert [(r["partition"], r["offset"]) for r in rows] == [(2, 4), (3, 5)]
    assert [{k: v for k, v in r.items() if k not in ("partition", "offset")} for r in rows] == [
        orjson.loads(r.value) for r in records
    ]
    padded = orjson.dumps(envelope(0, 1))
    assert orjson.loads(json_rows([decode_priced(0, 9, 0, b"  " + padded + b"\n", parse)]))["offset"] == 9


def ms(iso: str) -> int:
    instant = datetime.fromisoformat(iso)
    return int(instant.timestamp()) * 1000 + instant.microsecond // 1000


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)))
def test_timestamp_fast_path_is_exact(instant):
    instant = instant.replace(tzinfo=UTC)
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
