"""Pure planning of the query API: segments, grains, buckets in time zones, cursors, money."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from query_api.errors import InvalidField
from query_api.logic import (
    DAY,
    HOUR,
    MINUTE,
    RAW,
    bucket_starts,
    coarsest_grain,
    decode_cursor,
    encode_cursor,
    money,
    plan_segments,
    zero_fill,
)

UTC = UTC


def t(s: str) -> datetime:
    return datetime.fromisoformat(s).astimezone(UTC)


def test_segments_use_the_coarsest_grain_in_the_middle_and_finer_at_the_edges():
    segs = plan_segments(t("2024-03-01T10:30:15.500+00:00"), t("2024-03-04T02:00:00+00:00"), [DAY, HOUR, MINUTE])
    assert [(s.grain, s.start.isoformat(), s.end.isoformat()) for s in segs] == [
        (RAW, "2024-03-01T10:30:15.500000+00:00", "2024-03-01T10:31:00+00:00"),
        (MINUTE, "2024-03-01T10:31:00+00:00", "2024-03-01T11:00:00+00:00"),
        (HOUR, "2024-03-01T11:00:00+00:00", "2024-03-02T00:00:00+00:00"),
        (DAY, "2024-03-02T00:00:00+00:00", "2024-03-04T00:00:00+00:00"),
        (HOUR, "2024-03-04T00:00:00+00:00", "2024-03-04T02:00:00+00:00"),
    ]


def test_without_minutes_the_edges_below_an_hour_are_raw():
    segs = plan_segments(t("2024-03-01T10:30:00+00:00"), t("2024-03-01T12:00:00+00:00"), [DAY, HOUR])
    assert [s.grain for s in segs] == [RAW, HOUR]


def test_aligned_range_is_one_aggregate_segment():
    segs = plan_segments(t("2024-01-01T00:00:00+00:00"), t("2024-04-01T00:00:00+00:00"), [DAY, HOUR, MINUTE])
    assert [(s.grain, s.start, s.end) for s in segs] == [
        (DAY, t("2024-01-01T00:00:00+00:00"), t("2024-04-01T00:00:00+00:00"))
    ]


instants = st.datetimes(min_value=datetime(2023, 1, 1), max_value=datetime(2025, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@settings(max_examples=300, deadline=None)
@given(instants, instants, st.sets(st.sampled_from([DAY, HOUR, MINUTE])))
def test_segments_tile_the_range_exactly(a, b, grains):
    start, end = min(a, b), max(a, b)
    segs = plan_segments(start, end, grains)
    if start == end:
        assert segs == []
        return
    assert segs[0].start == start and segs[-1].end == end
    for prev, nxt in zip(segs, segs[1:]):
        assert prev.end == nxt.start
    for s in segs:
        assert (s.grain in grains or s.grain == RAW) and s.start < s.end
        if s.grain:
            assert s.start.timestamp() % s.grain == 0 and s.end.timestamp() % s.grain == 0


@pytest.mark.parametrize(
    "granularity, tz, expected",
    [
        (None, "Asia/Kolkata", DAY),
        ("minute", "UTC", MINUTE),
        ("hour", "Europe/Berlin", HOUR),
        ("hour", "Asia/Kolkata", MINUTE),
        ("day", "UTC", DAY),
        ("day", "Europe/Berlin", HOUR),
        ("month", "America/New_York", HOUR),
        ("week", "Asia/Kathmandu", MINUTE),
        ("day", "Australia/Lord_Howe", MINUTE),  # +10:30 / +11:00
    ],
)
def test_coarsest_grain_follows_the_zone_offsets(granularity, tz, expected):
    assert (
        coarsest_grain(granularity, ZoneInfo(tz), t("2024-01-01T00:00:00+00:00"), t("2024-12-31T00:00:00+00:00"))
        == expected
    )


def test_europe_london_is_utc_only_in_winter():
    london = ZoneInfo("Europe/London")
    assert coarsest_grain("day", london, t("2024-01-01T00:00:00+00:00"), t("2024-02-01T00:00:00+00:00")) == DAY
    assert coarsest_grain("day", london, t("2024-03-01T00:00:00+00:00"), t("2024-04-15T00:00:00+00:00")) == HOUR


def test_day_buckets_in_berlin_across_dst_and_month_end():
    berlin = ZoneInfo("Europe/Berlin")
    starts = bucket_starts(t("2024-03-30T12:00:00+00:00"), t("2024-04-01T23:00:00+00:00"), "day", berlin)
    assert [s.isoformat() for s in starts] == [
        "2024-03-29T23:00:00+00:00",  # 30 March 00:00 CET
        "2024-03-30T23:00:00+00:00",  # 31 March 00:00 CET (DST starts at 02:00 that day)
        "2024-03-31T22:00:00+00:00",  # 1 April 00:00 CEST
        "2024-04-01T22:00:00+00:00",  # 2 April 00:00 CEST: the range ends at 01:00 that day
    ]


def test_month_and_week_buckets():
    ny = ZoneInfo("America/New_York")
    months = bucket_starts(t("2024-01-15T00:00:00+00:00"), t("2024-03-02T00:00:00+00:00"), "month", ny)
    assert [s.isoformat() for s in months] == [
        "2024-01-01T05:00:00+00:00",
        "2024-02-01T05:00:00+00:00",
        "2024-03-01T05:00:00+00:00",
    ]
    weeks = bucket_starts(t("2024-12-31T00:00:00+00:00"), t("2025-01-14T00:00:00+00:00"), "week", ZoneInfo("UTC"))
    assert [s.date().isoformat() for s in weeks] == ["2024-12-30", "2025-01-06", "2025-01-13"]


def test_hour_buckets_in_a_half_hour_zone():
    kolkata = ZoneInfo("Asia/Kolkata")
    starts = bucket_starts(t("2024-05-01T10:00:00+00:00"), t("2024-05-01T12:00:00+00:00"), "hour", kolkata)
    assert [s.strftime("%H:%M") for s in starts] == ["09:30", "10:30", "11:30"]


def test_hour_buckets_across_a_dst_change_have_no_gap():
    berlin = ZoneInfo("Europe/Berlin")
    starts = bucket_starts(t("2024-10-27T00:00:00+00:00"), t("2024-10-27T03:00:00+00:00"), "hour", berlin)
    assert starts == [t("2024-10-27T00:00:00+00:00"), t("2024-10-27T01:00:00+00:00"), t("2024-10-27T02:00:00+00:00")]


def test_too_many_buckets_is_a_field_error():
    with pytest.raises(InvalidField) as err:
        bucket_starts(t("2020-01-01T00:00:00+00:00"), t("2024-01-01T00:00:00+00:00"), "minute", ZoneInfo("UTC"))
    assert err.value.field == "granularity"


def test_zero_fill_pairs_every_bucket():
    starts = [t("2024-01-01T00:00:00+00:00"), t("2024-01-02T00:00:00+00:00")]
    filled = zero_fill(starts, {int(starts[1].timestamp()): {"calls": 3}}, {"calls": 0})
    assert filled == [(starts[0], {"calls": 0}), (starts[1], {"calls": 3})]


def test_cursor_round_trip_and_garbage():
    assert decode_cursor(encode_cursor(1_700_000_000_123, "ev-1")) == (1_700_000_000_123, "ev-1")
    for bad in ("", "!!!", encode_cursor(1, "x")[:-3] + "zz", "W1siYSJdXQ"):
        with pytest.raises(InvalidField):
            decode_cursor(bad)


def test_money_is_exact_string_and_number():
    assert money("cost", 1_234_567_890_123) == {
        "cost_usd": "1234.567890123",
        "cost_usd_number": 1234.567890123,
        "cost_nanos": 1_234_567_890_123,
    }
    assert money("cost", 1)["cost_usd"] == "0.000000001"
