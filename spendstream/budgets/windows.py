"""Budget windows: which window an instant falls in, and how far spend counts. Pure: no IO.

Windows (event time decides which window an event counts in):
- ``daily`` / ``weekly`` (Monday) / ``monthly``: calendar windows in the budget's IANA timezone,
  from local midnight to local midnight, so a window can last 23 or 25 hours across DST. A
  midnight that does not exist (DST at 00:00) starts the day at the first instant that does.
- ``total``: one window from the epoch, never ending.
- ``rolling_1h`` / ``rolling_24h``: spend in minute buckets; the window is the last 60 / 1440
  minutes up to the newest minute seen for the budget (stream time), so it slides with the stream
  and a late event counts while its minute is still inside it.

Saturation: a window's spend (and each agent's, model's and minute's share, and a projection)
stops at ``SPEND_CEILING_NANOS`` (Int64 max, about 9.2 billion USD) instead of growing past what
the state's wire format (orjson: 64-bit integers), the alert payload and ClickHouse's Int64
columns can hold. The highest budget limit (``spendstream.money.MAX_BUDGET_LIMIT_NANOS``, 1e9 USD)
is 9x below it, so every threshold and forecast decision is still exact; only the displayed spend
of a window past 9.2 billion USD is a floor. Exact long-range sums live in ClickHouse (Int128).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from spendstream.budgets.model import Budget
from spendstream.money import INT64_MAX, MAX_BUDGET_LIMIT_NANOS

MINUTE_MS = 60_000
ROLLING_MS = {"rolling_1h": 3_600_000, "rolling_24h": 86_400_000}
SPEND_CEILING_NANOS = INT64_MAX
assert MAX_BUDGET_LIMIT_NANOS * 2 < SPEND_CEILING_NANOS, "thresholds up to 200 % must stay exact below the ceiling"


def saturating_add(total: int, amount: int) -> int:
    """``total + amount``, stopping at the ceiling (see "Saturation" above)."""
    return min(total + amount, SPEND_CEILING_NANOS)


def _local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    # fold=0 on a nonexistent midnight takes the pre-transition offset, which lands on the
    # first instant of the day that exists
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()) * 1000


def calendar_window(window: str, tz_name: str, ts_ms: int) -> tuple[int, int | None]:
    """(start_ms, end_ms) of the calendar window holding ``ts_ms``; end is None for ``total``."""
    if window == "total":
        return 0, None
    tz = ZoneInfo(tz_name)
    day = datetime.fromtimestamp(ts_ms // 1000, tz).date()
    if window == "daily":
        first, nxt = day, day + timedelta(days=1)
    elif window == "weekly":
        first = day - timedelta(days=day.weekday())
        nxt = first + timedelta(days=7)
    elif window == "monthly":
        first = day.replace(day=1)
        nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        raise ValueError(f"not a calendar window: {window}")
    return _local_midnight_ms(first, tz), _local_midnight_ms(nxt, tz)


def current_window(budget: Budget, now_ms: int) -> tuple[int, int | None]:
    """The window in force at ``now_ms``: rolling windows end at the end of the current minute."""
    length = ROLLING_MS.get(budget.window)
    if length is not None:
        end = minute_of(now_ms) + MINUTE_MS
        return end - length, end
    return calendar_window(budget.window, budget.timezone, now_ms)


def minute_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % MINUTE_MS
