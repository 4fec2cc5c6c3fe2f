"""A window's spend saturates below what its wire format holds; every budget decision stays exact."""

from __future__ import annotations

import orjson

from spendstream.budgets import (
    MINUTE_MS,
    SPEND_CEILING_NANOS,
    Budget,
    BudgetState,
    Delta,
    SpendEvent,
    alert_value,
)
from spendstream.money import MAX_BUDGET_LIMIT_NANOS, MAX_EVENT_COST_NANOS

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
LATENESS_MS = 48 * 3_600_000
#: more events at the per-event cap than Int64 nano-USD (and orjson's 64-bit integers) can sum
EVENTS = SPEND_CEILING_NANOS // MAX_EVENT_COST_NANOS + 10


def budget(window: str) -> Budget:
    return Budget(tenant="t1", id="b1", name="b", scope={}, window=window, timezone="UTC",
                  limit_nanos=MAX_BUDGET_LIMIT_NANOS, forecast=window == "monthly")  # fmt: skip


def capped_events(start_ms: int, step_ms: int) -> Delta:
    events = [
        SpendEvent(f"e{i}", start_ms + i * step_ms, MAX_EVENT_COST_NANOS, "a", "openai/gpt-4o") for i in range(EVENTS)
    ]
    return Delta("t1", "b1", 0, [(1, events)])


def test_calendar_window_spend_saturates_and_every_record_still_encodes():
    b = budget("monthly")
    state = BudgetState()
    result = state.apply(b, [capped_events(T0, 1)], T0, LATENESS_MS)
    (window,) = state.windows.values()
    assert window.spent == SPEND_CEILING_NANOS
    assert window.agents == {"a": SPEND_CEILING_NANOS} and window.models == {"openai/gpt-4o": SPEND_CEILING_NANOS}
    # the state, its budget.state records and its alerts all encode (orjson refuses ints past 64 bits)
    assert BudgetState.loads(state.dumps()).windows[window.start].spent == SPEND_CEILING_NANOS
    (record,) = state.state_records(b, result.touched, T0)
    assert orjson.loads(record[1])["spent_nanos"] == SPEND_CEILING_NANOS
    for alert in result.alerts:
        orjson.loads(orjson.dumps(alert_value(alert, T0)))
    # thresholds are exact: 100 % fired at the 1,000th capped event (1e18 = 1,000 x 1e15), once each
    fired = [a for a in result.alerts if a.kind == "threshold"]
    assert sorted(str(a.threshold) for a in fired) == ["100", "50", "80"]
    assert {str(a.threshold): a.event.event_id for a in fired}["100"] == "e999"


def test_rolling_window_recovers_an_exact_sum_once_saturated_minutes_slide_out():
    b = budget("rolling_1h")
    state = BudgetState()
    state.apply(b, [capped_events(T0, 1)], T0, LATENESS_MS)
    assert state.rolling is not None and state.rolling.spent == SPEND_CEILING_NANOS
    # 61 minutes later one small event: every saturated minute slid out, the sum is exact again
    later = SpendEvent("late", T0 + 61 * MINUTE_MS, 7, "a", "openai/gpt-4o")
    state.apply(b, [Delta("t1", "b1", 0, [(2, [later])])], T0 + 61 * MINUTE_MS, LATENESS_MS)
    assert state.rolling.spent == 7
