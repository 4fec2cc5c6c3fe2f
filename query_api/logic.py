"""Pure planning for analytics queries: which table answers which part of a time range, bucket
boundaries in a time zone, zero-filling, keyset cursors and money formatting.

No HTTP or ClickHouse imports: routers turn these plans into SQL text with bound parameters.

Source choice. Aggregates hold whole UTC minutes, hours or days. A range [start, end) is cut into
segments: the coarsest grain that the buckets allow covers the aligned middle, finer grains cover
the ragged edges, and only a sub-minute edge (or a filter the aggregates cannot answer, such as a
tag) falls back to the raw events. Buckets allow a grain when every bucket boundary is a boundary
of that grain: UTC days for day/week/month buckets in a zone at UTC+0 all along the range, hours
for whole-hour offsets (e.g. Europe/Berlin, America/New_York), minutes for offsets such as
Asia/Kolkata (+05:30) or Asia/Kathmandu (+05:45).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson

from query_api.errors import InvalidField
from spendstream.money import INT64_MAX, NANOS_PER_USD

GRANULARITIES: tuple[str, ...] = ("minute", "hour", "day", "week", "month")
MAX_BUCKETS = 20_000

RAW, MINUTE, HOUR, DAY = 0, 60, 3600, 86400
#: grains an aggregate may have, coarsest first
AGGREGATE_GRAINS = (DAY, HOUR, MINUTE)
_UTC = UTC
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


@dataclass(frozen=True)
class Segment:
    grain: int  # seconds; RAW = the raw events
    start: datetime
    end: datetime


def _floor(t: datetime, grain: int) -> datetime:
    seconds = (t - _EPOCH) // timedelta(seconds=grain)
    return _EPOCH + timedelta(seconds=seconds * grain)


def _ceil(t: datetime, grain: int) -> datetime:
    floor = _floor(t, grain)
    return floor if floor == t else floor + timedelta(seconds=grain)


def plan_segments(start: datetime, end: datetime, grains: Iterable[int]) -> list[Segment]:
    """Cover [start, end) with as few, as coarse segments as possible, using the given aggregate
    grains (RAW covers whatever none of them can).

    Adjacent segments never overlap and leave no gap; the result is ordered by time.
    """
    return _cover(start, end, sorted(set(grains) - {RAW}, reverse=True))


def _cover(start: datetime, end: datetime, grains: list[int]) -> list[Segment]:
    if start >= end:
        return []
    if not grains:
        return [Segment(RAW, start, end)]
    grain, finer = grains[0], grains[1:]
    lo, hi = _ceil(start, grain), _floor(end, grain)
    if lo >= hi:
        return _cover(start, end, finer)
    return [*_cover(start, lo, finer), Segment(grain, lo, hi), *_cover(hi, end, finer)]


def _offsets(tz: ZoneInfo, start: datetime, end: datetime) -> set[timedelta]:
    """Every UTC offset ``tz`` takes within [start, end), sampled at least every 6 hours.

    Offsets only change at transitions, which real zones never place less than 6 hours apart,
    so 6-hourly samples plus both ends see every offset in use.
    """
    step = timedelta(hours=6)
    found = {end.astimezone(tz).utcoffset()}
    t = start
    while t < end:
        found.add(t.astimezone(tz).utcoffset())
        t += step
    return {o for o in found if o is not None}


def coarsest_grain(granularity: str | None, tz: ZoneInfo, start: datetime, end: datetime) -> int:
    """The coarsest aggregate grain whose boundaries include every bucket boundary.

    ``granularity=None`` (a total over the range, no buckets) allows UTC days.
    """
    if granularity is None:
        return DAY
    if granularity == "minute":
        return MINUTE
    offsets = _offsets(tz, start, end)
    whole_hours = all(o % timedelta(hours=1) == timedelta(0) for o in offsets)
    if granularity == "hour":
        return HOUR if whole_hours else MINUTE
    if offsets == {timedelta(0)}:
        return DAY
    return HOUR if whole_hours else MINUTE


def bucket_starts(start: datetime, end: datetime, granularity: str, tz: ZoneInfo) -> list[datetime]:
    """Start of every bucket that meets [start, end), in UTC, as ClickHouse computes them in ``tz``.

    The first bucket may begin before ``start`` (it is the bucket holding ``start``).
    """
    if granularity not in GRANULARITIES:
        raise InvalidField("granularity", f"expected one of {', '.join(GRANULARITIES)}")
    starts = list(_iter_bucket_starts(start, end, granularity, tz))
    if len(starts) > MAX_BUCKETS:
        raise InvalidField(
            "granularity",
            f"{len(starts)} {granularity} buckets in this range; at most {MAX_BUCKETS}: "
            "choose a coarser granularity or a shorter range",
        )
    return starts


def _iter_bucket_starts(start: datetime, end: datetime, granularity: str, tz: ZoneInfo) -> Iterator[datetime]:
    limit = MAX_BUCKETS + 1
    if granularity == "minute":
        # every real offset is a whole number of minutes, so local minutes are UTC minutes
        t = _floor(start, MINUTE)
        while t < end and limit:
            yield t
            t += timedelta(minutes=1)
            limit -= 1
        return
    if granularity == "hour":
        # offsets are multiples of 15 minutes: local hour starts are the quarter-hours whose
        # local clock reads :00 (this also gets DST changes of 30 minutes right)
        t = _floor(start - timedelta(hours=1), 15 * MINUTE)
        while t < end and limit:
            if t.astimezone(tz).minute == 0 and t + timedelta(hours=1) > start:
                yield t
                limit -= 1
            t += timedelta(minutes=15)
        return
    day = _local_floor(start, granularity, tz).astimezone(tz).date()
    while limit:
        t = _local_midnight(day, tz)
        if t >= end:
            return
        yield t
        day = _next_day_bucket(day, granularity)
        limit -= 1


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    # fold=0 and a zone without a midnight (DST at 00:00) both resolve like ClickHouse: the
    # wall-clock midnight mapped forward
    local = datetime(day.year, day.month, day.day, tzinfo=tz)
    return local.astimezone(_UTC)


def _next_day_bucket(day: date, granularity: str) -> date:
    if granularity == "day":
        return day + timedelta(days=1)
    if granularity == "week":
        return day + timedelta(days=7)
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _local_floor(t: datetime, granularity: str, tz: ZoneInfo) -> datetime:
    """Start of the day/week (Monday)/month bucket holding ``t``, in UTC."""
    d = t.astimezone(tz).date()
    if granularity == "week":
        d -= timedelta(days=d.weekday())
    elif granularity == "month":
        d = d.replace(day=1)
    return _local_midnight(d, tz)


def zero_fill(starts: Iterable[datetime], rows: dict[int, dict], empty: dict) -> list[tuple[datetime, dict]]:
    """Pair every bucket start with its row (keyed by epoch seconds) or ``empty``."""
    return [(s, rows.get(int(s.timestamp()), empty)) for s in starts]


# -- keyset cursors ---------------------------------------------------------------------------
def encode_cursor(timestamp_ms: int, event_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([timestamp_ms, event_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        ts, event_id = value
        if not isinstance(ts, int) or not isinstance(event_id, str):
            raise ValueError
        return ts, event_id
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidField("cursor", "not a cursor returned by this endpoint") from None


# -- money ------------------------------------------------------------------------------------
def money(name: str, nanos: int) -> dict[str, object]:
    """``{name}_usd`` exact decimal string, ``{name}_usd_number`` the nearest JSON number, ``{name}_nanos``.

    Exact for any integer: cost sums are Int128 (see usage_sql), and ``Decimal`` arithmetic would
    round past 28 digits. ``{name}_nanos`` is a JSON integer while it fits Int64 (every realistic
    figure); beyond that it is the exact decimal string, since orjson refuses integers past 64
    bits and JSON readers keep none that large."""
    nanos = int(nanos)
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    usd = f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"
    exact_nanos: int | str = nanos if -INT64_MAX - 1 <= nanos <= INT64_MAX else str(nanos)
    return {f"{name}_usd": usd, f"{name}_usd_number": float(usd), f"{name}_nanos": exact_nanos}
