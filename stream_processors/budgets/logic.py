"""Budgets core: scope matching, windows, threshold and forecast evaluation. Pure: no Kafka,
HTTP or ClickHouse imports; the budgets stage, the query API and the gateway's budget check all
use it.

Windows (event time decides which window an event counts in):
- ``daily`` / ``weekly`` (Monday) / ``monthly``: calendar windows in the budget's IANA timezone,
  from local midnight to local midnight, so a window can last 23 or 25 hours across DST. A
  midnight that does not exist (DST at 00:00) starts the day at the first instant that does.
- ``total``: one window from the epoch, never ending.
- ``rolling_1h`` / ``rolling_24h``: spend in minute buckets; the window is the last 60 / 1440
  minutes up to the newest minute seen for the budget (stream time), so it slides with the stream
  and a late event counts while its minute is still inside it.

Lateness: a calendar event whose window ended more than ``lateness_ms`` before ``now_ms`` (wall
clock) is too late: counted, not applied. Rolling windows ignore events whose minute already slid
out of the window; the total window takes everything.

Thresholds: a threshold ``t`` (percent) is crossed when ``spent * 100 >= t * limit``. It fires
the first time it is crossed in a window and is then *fired*; a fired threshold re-arms when the
window's spend is no longer over it under the current limit. That one rule gives both "raising
a limit re-arms only thresholds not yet crossed under the new limit" and "a rolling window fires
again after its spend dropped below and rose again". The alert id is stable per
(budget, window start, threshold, limit), so a replay produces the same id and a re-armed
threshold under a new limit gets a new one.

Forecast (daily/weekly/monthly, once per window): burn rate = spend in the last
``FORECAST_INTERVAL_MS`` of the window's stream time; projected end-of-window spend =
spent + rate * time left. Fires when that exceeds the limit before spend reached it, once at
least one interval of the window has passed (a rate from the first seconds would be noise).

Saturation: a window's spend (and each agent's, model's and minute's share, and a projection)
stops at ``SPEND_CEILING_NANOS`` (Int64 max, about 9.2 billion USD) instead of growing past what
the state's wire format (orjson: 64-bit integers), the alert payload and ClickHouse's Int64
columns can hold. The highest budget limit (``spendstream.money.MAX_BUDGET_LIMIT_NANOS``, 1e9 USD)
is 9x below it, so every threshold and forecast decision is still exact; only the displayed spend
of a window past 9.2 billion USD is a floor. Exact long-range sums live in ClickHouse (Int128).

Delta records (spendstream.budget.deltas, key = budget id) carry the events of one budget from
one usage.raw partition; the state keeps, per budget, the highest raw offset applied per raw
partition and drops events at or below it (the replay rule of spendstream/contracts.py).
"""

from __future__ import annotations

import functools
import heapq
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import orjson

from spendstream.contracts import (
    BUDGET_SCOPE_FIELDS,
    BUDGET_WINDOWS,
    SCHEMA_VERSION,
    budget_alert_id,
    nanos_to_usd_str,
)
from spendstream.money import BUDGET_LIMIT, INT64_MAX, MAX_BUDGET_LIMIT_NANOS

MINUTE_MS = 60_000
SPEND_CEILING_NANOS = INT64_MAX
assert MAX_BUDGET_LIMIT_NANOS * 2 < SPEND_CEILING_NANOS, "thresholds up to 200 % must stay exact below the ceiling"


def saturating_add(total: int, amount: int) -> int:
    """``total + amount``, stopping at the ceiling (see "Saturation" above)."""
    return min(total + amount, SPEND_CEILING_NANOS)


def _add_to(shares: dict[str, int], key: str, amount: int) -> None:
    shares[key] = saturating_add(shares.get(key, 0), amount)
ROLLING_MS = {"rolling_1h": 3_600_000, "rolling_24h": 86_400_000}
CALENDAR_WINDOWS = ("daily", "weekly", "monthly")
FORECAST_INTERVAL_MS = 15 * MINUTE_MS
DEFAULT_THRESHOLDS = (Decimal(50), Decimal(80), Decimal(100))
MAX_NAME = 256
MAX_THRESHOLDS = 20
MAX_SCOPE_VALUE = 256
TOP_N = 3
#: index lookups go from the field that usually has the most distinct values to the least, so a
#: budget is filed under the field that narrows candidates most
INDEX_ORDER = ("user", "agent", "model", "tag", "project", "provider")


# ---------------------------------------------------------------- budget config


@dataclass(frozen=True, slots=True)
class Budget:
    tenant: str
    id: str
    name: str
    #: set scope fields only (BUDGET_SCOPE_FIELDS); "tag" is "key=value"
    scope: Mapping[str, str]
    window: str
    timezone: str
    limit_nanos: int
    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    forecast: bool = True
    channels: tuple[str, ...] = ()
    enforce: bool = False

    @property
    def config_kind(self) -> str:
        """Windows of another kind or zone are different windows: state of the old kind is dropped."""
        return f"{self.window}|{self.timezone}"


def check_timezone(name: str) -> str:
    """The IANA zone name, or ValueError. Only real zone names: no abbreviations, no files."""
    if not isinstance(name, str) or name not in _zone_names():
        raise ValueError(f"not an IANA time zone name: {name!r}")
    return name


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(available_timezones()) | {"UTC"}
    return _ZONES


def check_window(name: str) -> str:
    if name not in BUDGET_WINDOWS:
        raise ValueError(f"must be one of {', '.join(BUDGET_WINDOWS)}")
    return name


def parse_limit_nanos(value: str | int | float) -> int:
    """A USD amount (decimal string or JSON number) -> nano-USD, within ``BUDGET_LIMIT``'s range
    (see spendstream/money.py); ``MoneyError`` (a ValueError naming ``limit_usd``) otherwise."""
    return BUDGET_LIMIT.nanos(value)


#: C0/C1 controls (CR and LF above all), Unicode line/paragraph separators and lone surrogates: a
#: name is copied into e-mail subjects and headers, chat messages and logs, where these split lines
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_budget_name(name: str) -> str:
    """The name trimmed, or ValueError: blank, longer than ``MAX_NAME``, or with control characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("must be a non-blank string")
    if len(name) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters")
    bad = _UNSAFE_NAME_CHARS.search(name)
    if bad:
        raise ValueError(f"must not contain control characters such as CR or LF (found U+{ord(bad[0]):04X})")
    return name.strip()


def parse_thresholds(values: Iterable[Any]) -> tuple[Decimal, ...]:
    """Percents in 1..1000 with at most 3 decimals, sorted, without duplicates."""
    out: set[Decimal] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"not a number: {value!r}")
        try:
            d = Decimal(value.strip() if isinstance(value, str) else repr(value))
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        if not d.is_finite() or not 1 <= d <= 1000:
            raise ValueError(f"each threshold must be between 1 and 1000 (percent), got {value!r}")
        if d != d.quantize(Decimal("0.001")):
            raise ValueError(f"at most 3 decimal places, got {value!r}")
        out.add(d.normalize())
    if not out:
        raise ValueError("give at least one threshold")
    if len(out) > MAX_THRESHOLDS:
        raise ValueError(f"at most {MAX_THRESHOLDS} thresholds")
    return tuple(sorted(out))


def parse_scope(scope: Mapping[str, Any]) -> dict[str, str]:
    """Validate a scope object; raises ``ScopeError(field, message)``. Names are normalised as the
    gateway normalises events (provider/model lower-case), so a budget matches what is stored."""
    out: dict[str, str] = {}
    for key, value in scope.items():
        if key not in BUDGET_SCOPE_FIELDS:
            raise ScopeError(key, f"unknown scope field; use {', '.join(BUDGET_SCOPE_FIELDS)}")
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_SCOPE_VALUE or not value.strip():
            raise ScopeError(key, f"must be a non-blank string of at most {MAX_SCOPE_VALUE} characters")
        value = value.strip()
        if key in ("provider", "model"):
            value = value.lower()
        if key == "tag":
            tag_key, sep, tag_value = value.partition("=")
            if not sep or not tag_key.strip():
                raise ScopeError(key, "must be 'key=value'")
            value = f"{tag_key.strip()}={tag_value.strip()}"
        out[key] = value
    return out


class ScopeError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def canonical_threshold(t: Decimal) -> str:
    return format(t.normalize(), "f")


#: budgets table scope columns <-> scope fields
SCOPE_COLUMNS = {f: f"scope_{f}" for f in ("project", "agent", "user", "provider", "model")}


def scope_columns(scope: Mapping[str, str]) -> dict[str, str]:
    cols = {col: scope.get(f, "") for f, col in SCOPE_COLUMNS.items()}
    tag_key, _, tag_value = scope.get("tag", "").partition("=")
    cols["scope_tag_key"], cols["scope_tag_value"] = tag_key, tag_value
    return cols


def scope_from_columns(row: Mapping[str, Any]) -> dict[str, str]:
    scope = {f: row[col] for f, col in SCOPE_COLUMNS.items() if row[col]}
    if row["scope_tag_key"]:
        scope["tag"] = f"{row['scope_tag_key']}={row['scope_tag_value']}"
    return scope


def budget_from_row(row: Mapping[str, Any]) -> Budget:
    """A ``budgets`` table row (clickhouse-connect named result) -> Budget."""
    return Budget(
        tenant=row["tenant"],
        id=row["id"],
        name=row["name"],
        scope=scope_from_columns(row),
        window=row["window"],
        timezone=row["timezone"],
        limit_nanos=int(row["limit_nanos"]),
        thresholds=tuple(sorted(Decimal(t).normalize() for t in row["thresholds"])),
        forecast=bool(row["forecast"]),
        channels=tuple(row["channels"]),
        enforce=bool(row["enforce"]),
    )


# ---------------------------------------------------------------- scope index


@dataclass(frozen=True, slots=True)
class Attribution:
    """What a budget scope can be matched against: one event's attribution, or a check request's."""

    project: str = ""
    agent: str = ""
    user: str = ""
    provider: str = ""
    model: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def value(self, scope_field: str) -> str:
        return getattr(self, scope_field)

    @classmethod
    def of_event(cls, event: Mapping[str, Any]) -> Attribution:
        return cls(
            event.get("project", ""), event.get("agent", ""), event.get("user", ""),
            event.get("provider", ""), event.get("model", ""), event.get("tags") or {},
        )  # fmt: skip


def scope_matches(scope: Mapping[str, str], attr: Attribution) -> bool:
    for key, want in scope.items():
        if key == "tag":
            tag_key, _, tag_value = want.partition("=")
            if attr.tags.get(tag_key) != tag_value:
                return False
        elif attr.value(key) != want:
            return False
    return True


class ScopeIndex:
    """Budgets by (tenant, index field, value): an event looks up a handful of keys instead of
    scanning the tenant's budgets. Each budget is filed once, under its most selective set field
    (INDEX_ORDER); tenant-wide budgets (empty scope) are filed per tenant."""

    def __init__(self, budgets: Iterable[Budget] = ()):
        self.budgets: dict[str, Budget] = {}
        self._by_key: dict[tuple[str, str, str], list[Budget]] = {}
        self._tenant_wide: dict[str, list[Budget]] = {}
        #: tag keys some budget of the tenant filters on (events may carry 32 tags; look up only these)
        self._tag_keys: dict[str, set[str]] = {}
        for budget in budgets:
            self.budgets[budget.id] = budget
            indexed = next((f for f in INDEX_ORDER if f in budget.scope), None)
            if indexed is None:
                self._tenant_wide.setdefault(budget.tenant, []).append(budget)
                continue
            self._by_key.setdefault((budget.tenant, indexed, budget.scope[indexed]), []).append(budget)
            if indexed == "tag":
                self._tag_keys.setdefault(budget.tenant, set()).add(budget.scope["tag"].partition("=")[0])
        self._tenants = {b.tenant for b in self.budgets.values()}
        fields: dict[str, set[str]] = {}
        for budget in self.budgets.values():
            fields.setdefault(budget.tenant, set()).update(f for f in budget.scope if f != "tag")
        self._match_fields = {
            tenant: (tuple(sorted(fields.get(tenant, ()))), tuple(sorted(self._tag_keys.get(tenant, ()))))
            for tenant in self._tenants
        }

    def __len__(self) -> int:
        return len(self.budgets)

    def has_tenant(self, tenant: str) -> bool:
        return tenant in self._tenants

    def match_fields(self, tenant: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(attribution fields, tag keys) that some budget of ``tenant`` filters on: only these
        decide which of its budgets an event matches."""
        return self._match_fields.get(tenant, ((), ()))

    def candidates(self, tenant: str, attr: Attribution) -> Iterator[Budget]:
        yield from self._tenant_wide.get(tenant, ())
        by_key = self._by_key
        for name in INDEX_ORDER:
            if name == "tag":
                for tag_key in self._tag_keys.get(tenant, ()):
                    if tag_key in attr.tags:
                        yield from by_key.get((tenant, "tag", f"{tag_key}={attr.tags[tag_key]}"), ())
            else:
                value = attr.value(name)
                if value:
                    yield from by_key.get((tenant, name, value), ())

    def match(self, tenant: str, attr: Attribution) -> list[Budget]:
        return [b for b in self.candidates(tenant, attr) if scope_matches(b.scope, attr)]


# ---------------------------------------------------------------- windows


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


# ---------------------------------------------------------------- per-window spend


def _crossed(spent: int, limit: int, threshold: Decimal) -> bool:
    # spent * 100 >= t * limit, in integers (t has at most 3 decimals)
    return spent * 100_000 >= int(threshold * 1000) * limit


def percent_used(spent: int, limit: int) -> Decimal:
    """Percent of the limit, rounded down to 2 decimals (never shows 100 before the limit)."""
    return (Decimal(spent) * 100 / Decimal(limit)).quantize(Decimal("0.01"), rounding=ROUND_FLOOR)


def _top(amounts: Mapping[str, int]) -> list[tuple[str, int]]:
    return heapq.nlargest(TOP_N, amounts.items(), key=lambda kv: (kv[1], kv[0]))


def top_list(agents: Mapping[str, int], models: Mapping[str, int]) -> list[dict[str, str]]:
    return [{"kind": "agent", "name": n, "spent_usd": nanos_to_usd_str(v)} for n, v in _top(agents)] + [
        {"kind": "model", "name": n, "spent_usd": nanos_to_usd_str(v)} for n, v in _top(models)
    ]


@dataclass(slots=True)
class SpendEvent:
    """One priced event as a budget needs it (a delta item)."""

    event_id: str
    ts_ms: int
    cost_nanos: int
    agent: str
    model: str  # "provider/model"

    def to_wire(self) -> list[Any]:
        return [self.event_id, self.ts_ms, self.cost_nanos, self.agent, self.model]

    @classmethod
    def from_wire(cls, item: list[Any]) -> SpendEvent:
        return cls(*item)


@dataclass(slots=True)
class Alert:
    kind: str  # "threshold" | "forecast"
    budget: Budget
    window_start: int
    window_end: int | None
    threshold: Decimal | None
    spent: int
    limit: int
    top: list[dict[str, str]]
    event: SpendEvent
    projected: int | None = None
    projected_at: int | None = None

    @property
    def alert_id(self) -> str:
        label = "forecast" if self.threshold is None else f"{canonical_threshold(self.threshold)}@{self.limit}"
        return budget_alert_id(self.budget.id, self.window_start, label)


@functools.lru_cache(maxsize=4096)  # window bounds repeat on every budget check
def _rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def alert_value(alert: Alert, created_at_ms: int) -> dict[str, Any]:
    """The spendstream.budget.alerts value (spendstream/contracts.py, "budget alerts")."""
    b = alert.budget
    return {
        "v": SCHEMA_VERSION,
        "alert_id": alert.alert_id,
        "kind": alert.kind,
        "tenant": b.tenant,
        "budget_id": b.id,
        "budget_name": b.name,
        "scope": dict(b.scope),
        "window": b.window,
        "timezone": b.timezone,
        "window_start": _rfc3339(alert.window_start),
        "window_end": _rfc3339(alert.window_end),
        "threshold": None if alert.threshold is None else canonical_threshold(alert.threshold),
        "spent_usd": nanos_to_usd_str(alert.spent),
        "limit_usd": nanos_to_usd_str(alert.limit),
        "spent_nanos": alert.spent,
        "limit_nanos": alert.limit,
        "percent_used": str(percent_used(alert.spent, alert.limit)),
        "projected_usd": None if alert.projected is None else nanos_to_usd_str(alert.projected),
        "projected_nanos": alert.projected,
        "projected_at": _rfc3339(alert.projected_at),
        "top": alert.top,
        "event_id": alert.event.event_id,
        "event_time": _rfc3339(alert.event.ts_ms),
        "channels": list(b.channels),
        "created_at": _rfc3339(created_at_ms),
    }


def _evaluate_thresholds(budget: Budget, fired: set[str], spent: int, fire: Callable[[Decimal], None]) -> None:
    """Re-arm fired thresholds no longer crossed under the current limit; fire newly crossed ones."""
    fired.difference_update([t for t in fired if not _crossed(spent, budget.limit_nanos, Decimal(t))])
    for threshold in budget.thresholds:
        label = canonical_threshold(threshold)
        if label not in fired and _crossed(spent, budget.limit_nanos, threshold):
            fired.add(label)
            fire(threshold)


@dataclass
class CalendarWindow:
    """Spend of one calendar (or total) window."""

    start: int
    end: int | None
    spent: int = 0
    agents: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    #: thresholds (canonical strings) fired and not re-armed
    fired: set[str] = field(default_factory=set)
    forecast_fired: bool = False
    #: newest event time applied (the window's stream time, for the burn rate)
    latest_ms: int = 0
    #: minute -> spend, for the last FORECAST_INTERVAL_MS before latest_ms
    recent: dict[int, int] = field(default_factory=dict)

    def add(self, ev: SpendEvent) -> None:
        self.spent = saturating_add(self.spent, ev.cost_nanos)
        _add_to(self.agents, ev.agent, ev.cost_nanos)
        _add_to(self.models, ev.model, ev.cost_nanos)
        minute = minute_of(ev.ts_ms)
        self.latest_ms = max(self.latest_ms, ev.ts_ms)
        horizon = minute_of(self.latest_ms) - FORECAST_INTERVAL_MS
        if minute > horizon:
            self.recent[minute] = saturating_add(self.recent.get(minute, 0), ev.cost_nanos)
        for old in [m for m in self.recent if m <= horizon]:
            del self.recent[old]

    def evaluate(self, budget: Budget, ev: SpendEvent, out: list[Alert]) -> None:
        def fire(threshold: Decimal) -> None:
            out.append(Alert("threshold", budget, self.start, self.end, threshold, self.spent, budget.limit_nanos,
                             top_list(self.agents, self.models), ev))

        _evaluate_thresholds(budget, self.fired, self.spent, fire)
        if budget.forecast and not self.forecast_fired and self.end is not None:
            projection = self.forecast(budget.limit_nanos)
            if projection is not None:
                self.forecast_fired = True
                projected, projected_at = projection
                out.append(Alert("forecast", budget, self.start, self.end, None, self.spent, budget.limit_nanos,
                                 top_list(self.agents, self.models), ev, projected, projected_at))

    def forecast(self, limit: int) -> tuple[int, int] | None:
        """(projected end-of-window spend, expected crossing time) when the burn rate of the last
        interval carries spend over ``limit`` before the window ends; else None."""
        assert self.end is not None
        if self.spent >= limit or self.latest_ms - self.start < FORECAST_INTERVAL_MS:
            return None
        burned = sum(self.recent.values())
        if burned <= 0:
            return None
        # rate = burned / FORECAST_INTERVAL_MS, kept as a fraction so the projection stays exact
        projected = saturating_add(self.spent, burned * (self.end - self.latest_ms) // FORECAST_INTERVAL_MS)
        if projected <= limit:
            return None
        to_go = limit - self.spent
        crossing = self.latest_ms + -(-to_go * FORECAST_INTERVAL_MS // burned)
        return projected, crossing

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "spent": self.spent, "agents": self.agents,
            "models": self.models, "fired": sorted(self.fired), "forecast_fired": self.forecast_fired,
            "latest_ms": self.latest_ms, "recent": [[m, v] for m, v in self.recent.items()],
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CalendarWindow:
        return cls(d["start"], d["end"], d["spent"], d["agents"], d["models"], set(d["fired"]), d["forecast_fired"],
                   d["latest_ms"], {m: v for m, v in d["recent"]})


@dataclass
class MinuteBucket:
    spent: int = 0
    agents: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)


@dataclass
class RollingWindow:
    """Spend of a sliding window of ``length_ms`` over minute buckets, ending at the newest minute
    seen (``now_minute``). ``spent`` is kept incrementally as the window slides."""

    length_ms: int
    now_minute: int = 0
    spent: int = 0
    buckets: dict[int, MinuteBucket] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)

    @property
    def start(self) -> int:
        """First instant inside the window (the minute after the oldest one that slid out)."""
        return self.now_minute + MINUTE_MS - self.length_ms

    def inside(self, ts_ms: int) -> bool:
        return minute_of(ts_ms) >= self.start

    def slide_to(self, ts_ms: int) -> None:
        minute = minute_of(ts_ms)
        if minute <= self.now_minute:
            return
        self.now_minute = minute
        saturated = self.spent == SPEND_CEILING_NANOS
        for old in [m for m in self.buckets if m < self.start]:
            self.spent -= self.buckets.pop(old).spent
        if saturated:  # a saturated total is a floor, not a sum: subtracting from it would undercount
            self.spent = min(sum(b.spent for b in self.buckets.values()), SPEND_CEILING_NANOS)

    def add(self, ev: SpendEvent) -> None:
        bucket = self.buckets.setdefault(minute_of(ev.ts_ms), MinuteBucket())
        bucket.spent = saturating_add(bucket.spent, ev.cost_nanos)
        _add_to(bucket.agents, ev.agent, ev.cost_nanos)
        _add_to(bucket.models, ev.model, ev.cost_nanos)
        self.spent = saturating_add(self.spent, ev.cost_nanos)

    def evaluate(self, budget: Budget, ev: SpendEvent, out: list[Alert]) -> None:
        def fire(threshold: Decimal) -> None:
            agents: dict[str, int] = {}
            models: dict[str, int] = {}
            for bucket in self.buckets.values():
                for k, v in bucket.agents.items():
                    _add_to(agents, k, v)
                for k, v in bucket.models.items():
                    _add_to(models, k, v)
            end = self.now_minute + MINUTE_MS
            out.append(Alert("threshold", budget, self.start, end, threshold, self.spent, budget.limit_nanos,
                             top_list(agents, models), ev))

        _evaluate_thresholds(budget, self.fired, self.spent, fire)

    def to_json(self) -> dict[str, Any]:
        return {
            "length_ms": self.length_ms, "now_minute": self.now_minute, "spent": self.spent, "fired": sorted(self.fired),
            "buckets": [[m, b.spent, b.agents, b.models] for m, b in self.buckets.items()],
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RollingWindow:
        buckets = {m: MinuteBucket(s, a, mo) for m, s, a, mo in d["buckets"]}
        return cls(d["length_ms"], d["now_minute"], d["spent"], buckets, set(d["fired"]))


# ---------------------------------------------------------------- per-budget state


@dataclass(slots=True)
class Delta:
    """One spendstream.budget.deltas record: one budget's events from one usage.raw partition."""

    tenant: str
    budget_id: str
    src_partition: int
    #: (raw offset, events of that raw record matching the budget), offsets ascending
    records: list[tuple[int, list[SpendEvent]]]

    def encode(self) -> bytes:
        return orjson.dumps({
            "v": SCHEMA_VERSION, "tenant": self.tenant, "budget_id": self.budget_id,
            "src": {"partition": self.src_partition},
            "records": [[offset, [e.to_wire() for e in events]] for offset, events in self.records],
        })  # fmt: skip

    @classmethod
    def decode(cls, value: bytes) -> Delta:
        d = orjson.loads(value)
        if d.get("v") != SCHEMA_VERSION:
            raise ValueError(f"unknown delta version {d.get('v')!r}")
        records = [(offset, [SpendEvent.from_wire(e) for e in events]) for offset, events in d["records"]]
        return cls(d["tenant"], d["budget_id"], d["src"]["partition"], records)


@dataclass
class ApplyResult:
    alerts: list[Alert] = field(default_factory=list)
    applied: int = 0
    replayed: int = 0
    late: int = 0
    #: calendar window starts (or "rolling") whose spend changed: their budget.state records
    touched: set[int | str] = field(default_factory=set)


@dataclass
class BudgetState:
    """Everything the stage keeps per budget (one Faust table value, keyed by budget id)."""

    kind: str = ""
    #: usage.raw partition -> highest raw offset applied
    watermarks: dict[int, int] = field(default_factory=dict)
    windows: dict[int, CalendarWindow] = field(default_factory=dict)
    rolling: RollingWindow | None = None

    def apply(self, budget: Budget, deltas: Iterable[Delta], now_ms: int, lateness_ms: int) -> ApplyResult:
        """Apply a batch of deltas in order; evaluate thresholds after every event (so the alert
        names the event that crossed and its figures do not depend on batch boundaries)."""
        result = ApplyResult()
        if self.kind != budget.config_kind:
            self.kind, self.windows, self.rolling = budget.config_kind, {}, None
        length = ROLLING_MS.get(budget.window)
        if length is not None and self.rolling is None:
            self.rolling = RollingWindow(length)
        for delta in deltas:
            watermark = self.watermarks.get(delta.src_partition, -1)
            for offset, events in delta.records:
                if offset <= watermark:
                    result.replayed += len(events)
                    continue
                watermark = offset
                for ev in events:
                    if self._apply_event(budget, ev, now_ms, lateness_ms, result):
                        result.applied += 1
                    else:
                        result.late += 1
            self.watermarks[delta.src_partition] = watermark
        self.expire(now_ms, lateness_ms)
        return result

    def _apply_event(self, budget: Budget, ev: SpendEvent, now_ms: int, lateness_ms: int, result: ApplyResult) -> bool:
        if self.rolling is not None:
            rolling = self.rolling
            rolling.slide_to(ev.ts_ms)
            if not rolling.inside(ev.ts_ms):
                return False
            rolling.add(ev)
            rolling.evaluate(budget, ev, result.alerts)
            result.touched.add("rolling")
            return True
        start, end = calendar_window(budget.window, budget.timezone, ev.ts_ms)
        if end is not None and end < now_ms - lateness_ms:
            return False
        window = self.windows.get(start)
        if window is None:
            window = self.windows[start] = CalendarWindow(start, end)
        window.add(ev)
        window.evaluate(budget, ev, result.alerts)
        result.touched.add(start)
        return True

    def expire(self, now_ms: int, lateness_ms: int) -> None:
        for start in [s for s, w in self.windows.items() if w.end is not None and w.end < now_ms - lateness_ms]:
            del self.windows[start]

    def dumps(self) -> bytes:
        return orjson.dumps({
            "kind": self.kind,
            "watermarks": [[p, o] for p, o in self.watermarks.items()],
            "windows": [w.to_json() for w in self.windows.values()],
            "rolling": self.rolling.to_json() if self.rolling else None,
        })  # fmt: skip

    @classmethod
    def loads(cls, value: bytes) -> BudgetState:
        d = orjson.loads(value)
        return cls(
            d["kind"],
            {p: o for p, o in d["watermarks"]},
            {w["start"]: CalendarWindow.from_json(w) for w in d["windows"]},
            RollingWindow.from_json(d["rolling"]) if d["rolling"] else None,
        )

    def state_records(self, budget: Budget, touched: Iterable[int | str], now_ms: int) -> list[tuple[bytes, bytes]]:
        """spendstream.budget.state records (key, value) for the touched windows."""
        out = []
        for which in touched:
            if which == "rolling":
                assert self.rolling is not None
                r = self.rolling
                value: dict[str, Any] = {
                    "window_start": r.start, "window_end": r.now_minute + MINUTE_MS, "spent_nanos": r.spent,
                    "buckets": sorted([m, b.spent] for m, b in r.buckets.items()),
                }  # fmt: skip
            else:
                w = self.windows.get(which)  # type: ignore[call-overload]
                if w is None:  # expired in the same batch
                    continue
                value = {"window_start": w.start, "window_end": w.end, "spent_nanos": w.spent}
            value |= {
                "v": SCHEMA_VERSION, "tenant": budget.tenant, "budget_id": budget.id, "window": budget.window,
                "timezone": budget.timezone, "limit_nanos": budget.limit_nanos, "updated_at": now_ms,
            }  # fmt: skip
            out.append((state_key(budget.id, which), orjson.dumps(value)))
        return out


def state_key(budget_id: str, which: int | str) -> bytes:
    return f"{budget_id}|{which}".encode()


# ---------------------------------------------------------------- the budget check


@dataclass(frozen=True, slots=True)
class BudgetStanding:
    budget: Budget
    window_start: int
    window_end: int | None
    spent: int

    @property
    def remaining(self) -> int:
        return max(0, self.budget.limit_nanos - self.spent)

    def allows(self, estimate_nanos: int) -> bool:
        """An enforced budget denies once exhausted, or when the estimate would exceed it."""
        if not self.budget.enforce:
            return True
        limit = self.budget.limit_nanos
        return self.spent < limit and self.spent + estimate_nanos <= limit

    def to_json(self) -> dict[str, Any]:
        b = self.budget
        return {
            "id": b.id, "name": b.name, "window": b.window, "timezone": b.timezone,
            "window_start": _rfc3339(self.window_start) if b.window != "total" else None,
            "window_end": _rfc3339(self.window_end),
            "spent_usd": nanos_to_usd_str(self.spent), "limit_usd": nanos_to_usd_str(b.limit_nanos),
            "remaining_usd": nanos_to_usd_str(self.remaining),
            "percent_used": str(percent_used(self.spent, b.limit_nanos)), "enforce": b.enforce,
        }  # fmt: skip


def spent_from_state(budget: Budget, record: Mapping[str, Any] | None, now_ms: int) -> tuple[int, int, int | None]:
    """(spent, window start, window end) at ``now_ms`` from the budget's latest budget.state value
    for the current window (``None``: nothing spent in it yet)."""
    start, end = current_window(budget, now_ms)
    return spent_in_window(budget, record, start), start, end


def spent_in_window(budget: Budget, record: Mapping[str, Any] | None, window_start: int) -> int:
    """Spend of the window starting at ``window_start`` from its budget.state value. Rolling
    records carry minute buckets, summed from the window's start."""
    if record is None:
        return 0
    if budget.window in ROLLING_MS:
        return sum(v for m, v in record["buckets"] if m >= window_start)
    return record["spent_nanos"]


def state_lookup_key(budget: Budget, now_ms: int) -> bytes:
    """The budget.state key holding ``budget``'s current window."""
    return window_state_key(budget, current_window(budget, now_ms)[0])


def window_state_key(budget: Budget, window_start: int) -> bytes:
    """The budget.state key of ``budget``'s window starting at ``window_start`` (one key for a
    rolling window)."""
    return state_key(budget.id, "rolling" if budget.window in ROLLING_MS else window_start)


# ---------------------------------------------------------------- repartitioning


def stable_partition(key: str, partitions: int) -> int:
    """The partition of a budget.deltas key (budget id) or budget.alerts key (alert id): a stable
    hash, so a budget's deltas and its table entry always live on one partition, whoever sends."""
    return zlib.crc32(key.encode()) % partitions


@dataclass
class RepartitionResult:
    deltas: list[Delta] = field(default_factory=list)
    events: int = 0
    matched: int = 0
    bad_records: int = 0


def build_deltas(index: ScopeIndex, values: Iterable[bytes | None], parse_ts: Callable[[str], int]) -> RepartitionResult:
    """usage.priced values (in partition order) -> one delta per (budget, raw partition) holding
    every matching event, grouped by raw record. Values that are not priced envelopes are
    counted and skipped (the sink sends them to the DLQ).

    Events of a batch repeat a few attributions (agents of a fleet): the budgets matching an
    attribution are looked up once per batch, and each event is converted once however many
    budgets it counts for."""
    result = RepartitionResult()
    by_key: dict[tuple[str, int], Delta] = {}
    matches: dict[tuple[Any, ...], list[Budget]] = {}
    for value in values:
        try:
            env = orjson.loads(value or b"")
            tenant, src, events = env["tenant"], env["src"], env["events"]
            src_partition, src_offset = src["partition"], src["offset"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            result.bad_records += 1
            continue
        result.events += len(events)
        if not index.has_tenant(tenant):
            continue
        fields, tag_keys = index.match_fields(tenant)
        matched: dict[str, list[SpendEvent]] = {}
        for ev in events:
            tags = ev.get("tags") or {}
            key = (tenant, *(ev.get(f, "") for f in fields), *(tags.get(k) for k in tag_keys))
            budgets = matches.get(key)
            if budgets is None:
                budgets = matches[key] = index.match(tenant, Attribution.of_event(ev))
            if not budgets:
                continue
            spend = SpendEvent(
                ev["event_id"], parse_ts(ev["timestamp"]), ev.get("cost_nanos", 0), ev.get("agent", ""),
                f"{ev.get('provider', '')}/{ev.get('model', '')}",
            )  # fmt: skip
            for b in budgets:
                matched.setdefault(b.id, []).append(spend)
        for budget_id, spend_list in matched.items():
            result.matched += len(spend_list)
            delta = by_key.get((budget_id, src_partition))
            if delta is None:
                delta = by_key[(budget_id, src_partition)] = Delta(tenant, budget_id, src_partition, [])
                result.deltas.append(delta)
            delta.records.append((src_offset, spend_list))
    return result


# ---------------------------------------------------------------- source positions


@dataclass
class PositionSplit:
    """One batch of a source topic checked against the positions kept with the state."""

    #: indexes of the items to process, in order
    take: list[int] = field(default_factory=list)
    #: indexes of items already processed before (redelivered): ack, do not process
    stale: list[int] = field(default_factory=list)
    #: (partition, first missing offset, the offset that came instead): the consumer skipped
    #: these messages; they must be read and processed before that offset
    gaps: list[tuple[int, int, int]] = field(default_factory=list)
    #: partition -> next offset once the batch (and its gaps) is processed
    advanced: dict[int, int] = field(default_factory=dict)


def split_by_position(items: Iterable[tuple[int, int]], positions: Mapping[int, int]) -> PositionSplit:
    """Check (partition, offset) items (in delivery order) against the next offset to process per
    partition. Offsets of these topics are contiguous (no compaction, no transactions), so an
    offset below the expected one is a redelivery and one above it means messages were skipped
    before reaching the stage. A partition without a position (never processed) starts wherever
    its first item is."""
    out = PositionSplit()
    expected = dict(positions)
    for index, (partition, offset) in enumerate(items):
        want = expected.get(partition)
        if want is not None and offset < want:
            out.stale.append(index)
            continue
        if want is not None and offset > want:
            out.gaps.append((partition, want, offset))
        out.take.append(index)
        expected[partition] = out.advanced[partition] = offset + 1
    return out
