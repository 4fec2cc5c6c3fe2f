"""Instants as Spendstream writes and reads them: RFC 3339 text, epoch milliseconds, datetimes.
Exact (integers, no floats) and pure.

Every timestamp on the wire has one canonical form, ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC,
milliseconds): the gateway normalises event time to it and the stages write it. Datetimes that
come back from ClickHouse (DateTime64 columns) are naive and mean UTC.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime, timedelta
from typing import overload

_UTC = UTC
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


def epoch_ms(t: datetime) -> int:
    """Epoch milliseconds of an instant, rounded down; a naive datetime is UTC."""
    aware = t if t.tzinfo is not None else t.replace(tzinfo=_UTC)
    return (aware - _EPOCH) // timedelta(milliseconds=1)


@functools.lru_cache(maxsize=4096)  # instants written together share few seconds
def _second_prefix(unix_seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_seconds))


@overload
def format_epoch_ms(ms: int) -> str: ...
@overload
def format_epoch_ms(ms: None) -> None: ...
def format_epoch_ms(ms: int | None) -> str | None:
    """Epoch milliseconds -> the canonical form; None stays None (an open window end)."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return f"{_second_prefix(seconds)}.{millis:03d}Z"


def format_timestamp(dt: datetime) -> str:
    """An aware datetime -> the canonical form."""
    dt = dt.astimezone(_UTC)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f".{dt.microsecond // 1000:03d}Z"
    )


@overload
def iso_utc(t: datetime) -> str: ...
@overload
def iso_utc(t: None) -> None: ...
def iso_utc(t: datetime | None) -> str | None:
    """A datetime read from ClickHouse -> RFC 3339 with milliseconds and its offset (``+00:00``);
    None stays None (a NULL column)."""
    if t is None:
        return None
    return (t if t.tzinfo is not None else t.replace(tzinfo=_UTC)).isoformat(timespec="milliseconds")


class TimestampParser:
    """RFC 3339 -> epoch milliseconds, exactly (ints, no float); a time without an offset is UTC.
    The canonical form takes a cached fast path (events of a batch share few seconds), anything
    else goes through ``datetime.fromisoformat``."""

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
        return epoch_ms(datetime.fromisoformat(value))
