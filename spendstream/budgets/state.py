"""Per-budget state of the budgets stage: spend per window, thresholds and forecasts, the alerts
they raise, and the wire formats of spend deltas, state and alerts. Pure: no IO.

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

Sums saturate at ``SPEND_CEILING_NANOS`` (see :mod:`spendstream.budgets.windows`).

Delta records (spendstream.budget.deltas, key = budget id) carry the events of one budget from
one usage.raw partition; the state keeps, per budget, the highest raw offset applied per raw
partition and drops events at or below it (the replay rule of spendstream/contracts.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import orjson

from spendstream.budgets.model import Budget, canonical_threshold
from spendstream.budgets.windows import (
    MINUTE_MS,
    ROLLING_MS,
    SPEND_CEILING_NANOS,
    calendar_window,
    minute_of,
    saturating_add,
)
from spendstream.contracts import SCHEMA_VERSION, budget_alert_id, nanos_to_usd_str
from spendstream.timeutil import format_epoch_ms

FORECAST_INTERVAL_MS = 15 * MINUTE_MS
TOP_N = 3


def _add_to(shares: dict[str, int], key: str, amount: int) -> None:
    shares[key] = saturating_add(shares.get(key, 0), amount)


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
        "window_start": format_epoch_ms(alert.window_start),
        "window_end": format_epoch_ms(alert.window_end),
        "threshold": None if alert.threshold is None else canonical_threshold(alert.threshold),
        "spent_usd": nanos_to_usd_str(alert.spent),
        "limit_usd": nanos_to_usd_str(alert.limit),
        "spent_nanos": alert.spent,
        "limit_nanos": alert.limit,
        "percent_used": str(percent_used(alert.spent, alert.limit)),
        "projected_usd": None if alert.projected is None else nanos_to_usd_str(alert.projected),
        "projected_nanos": alert.projected,
        "projected_at": format_epoch_ms(alert.projected_at),
        "top": alert.top,
        "event_id": alert.event.event_id,
        "event_time": format_epoch_ms(alert.event.ts_ms),
        "channels": list(b.channels),
        "created_at": format_epoch_ms(created_at_ms),
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
            out.append(
                Alert(
                    "threshold",
                    budget,
                    self.start,
                    self.end,
                    threshold,
                    self.spent,
                    budget.limit_nanos,
                    top_list(self.agents, self.models),
                    ev,
                )
            )

        _evaluate_thresholds(budget, self.fired, self.spent, fire)
        if budget.forecast and not self.forecast_fired and self.end is not None:
            projection = self.forecast(budget.limit_nanos)
            if projection is not None:
                self.forecast_fired = True
                projected, projected_at = projection
                out.append(
                    Alert(
                        "forecast",
                        budget,
                        self.start,
                        self.end,
                        None,
                        self.spent,
                        budget.limit_nanos,
                        top_list(self.agents, self.models),
                        ev,
                        projected,
                        projected_at,
                    )
                )

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
        return cls(
            d["start"],
            d["end"],
            d["spent"],
            d["agents"],
            d["models"],
            set(d["fired"]),
            d["forecast_fired"],
            d["latest_ms"],
            {m: v for m, v in d["recent"]},
        )


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
            out.append(
                Alert(
                    "threshold",
                    budget,
                    self.start,
                    end,
                    threshold,
                    self.spent,
                    budget.limit_nanos,
                    top_list(agents, models),
                    ev,
                )
            )

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
