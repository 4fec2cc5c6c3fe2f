"""Which span a run collects. Pure.

A run asks for ``[start, end)``: ``end`` is now; ``start`` is the stored watermark or, when the
provider may still revise it, earlier: every run re-collects at least the last ``recollect`` (48 h
by default, providers revise recent buckets), and a connection never collected starts
``backfill_days`` back. Both ends of the request are aligned to the dataset's buckets (``end``
rounded up, so the current partial bucket is included and replaced by later runs). The new
watermark is the start of the bucket holding ``now``: everything before it was collected at
least once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MAX_BACKFILL_DAYS = 90
DEFAULT_RECOLLECT = timedelta(hours=48)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime
    watermark: datetime  # stored after the run succeeds

    def buckets(self, bucket_seconds: int) -> int:
        return int((self.end - self.start).total_seconds()) // bucket_seconds


def floor_to(t: datetime, bucket_seconds: int) -> datetime:
    seconds = int((t - _EPOCH).total_seconds())
    return _EPOCH + timedelta(seconds=seconds - seconds % bucket_seconds)


def ceil_to(t: datetime, bucket_seconds: int) -> datetime:
    floored = floor_to(t, bucket_seconds)
    return floored if floored == t else floored + timedelta(seconds=bucket_seconds)


def plan(
    now: datetime,
    watermark: datetime | None,
    backfill_days: int,
    bucket_seconds: int,
    recollect: timedelta = DEFAULT_RECOLLECT,
) -> Window:
    """The window of an incremental run (see the module's docstring)."""
    if watermark is None:
        start = now - timedelta(days=backfill_days)
    else:
        start = min(watermark, now - recollect)
    return Window(floor_to(start, bucket_seconds), ceil_to(now, bucket_seconds), floor_to(now, bucket_seconds))


def backfill(now: datetime, days: int, bucket_seconds: int) -> Window:
    """The window of ``spendstream collectors backfill --days N`` (1..90)."""
    if not 1 <= days <= MAX_BACKFILL_DAYS:
        raise ValueError(f"days must be 1..{MAX_BACKFILL_DAYS}")
    return Window(
        floor_to(now - timedelta(days=days), bucket_seconds),
        ceil_to(now, bucket_seconds),
        floor_to(now, bucket_seconds),
    )
