"""Budgets: configs and their validation, scope matching, windows, per-budget state and the alerts
it raises, a budget's standing for the budget check. Pure: no IO; the ClickHouse rows, reads and
writes are in :mod:`spendstream.budgets.store`.

Query API: ``parse_scope`` / ``parse_thresholds`` / ``parse_limit_nanos`` / ``check_*`` the input
into a ``Budget``; status: ``BudgetStanding(budget, *current_window(budget, now_ms), spent)``.
Budgets stage: ``ScopeIndex(budgets).match(tenant, Attribution.of_event(event))``; per budget,
``BudgetState.apply(budget, deltas, now_ms, lateness_ms)``, then ``alert_value`` of its alerts and
``state_records`` of the windows it touched.
Gateway's check: ``spent_in_window(budget, state[window_state_key(budget, start)], start)`` into a
``BudgetStanding``, whose ``allows(estimate_nanos)`` answers.
"""

from spendstream.budgets.model import (
    DEFAULT_THRESHOLDS,
    Budget,
    ScopeError,
    canonical_threshold,
    check_budget_name,
    check_timezone,
    parse_limit_nanos,
    parse_scope,
    parse_thresholds,
)
from spendstream.budgets.scopes import Attribution, ScopeIndex, scope_matches
from spendstream.budgets.standing import BudgetStanding, spent_from_state, spent_in_window, window_state_key
from spendstream.budgets.state import (
    FORECAST_INTERVAL_MS,
    Alert,
    ApplyResult,
    BudgetState,
    Delta,
    SpendEvent,
    alert_value,
    percent_used,
    state_key,
)
from spendstream.budgets.windows import MINUTE_MS, ROLLING_MS, SPEND_CEILING_NANOS, calendar_window, current_window

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FORECAST_INTERVAL_MS",
    "MINUTE_MS",
    "ROLLING_MS",
    "SPEND_CEILING_NANOS",
    "Alert",
    "ApplyResult",
    "Attribution",
    "Budget",
    "BudgetStanding",
    "BudgetState",
    "Delta",
    "ScopeError",
    "ScopeIndex",
    "SpendEvent",
    "alert_value",
    "calendar_window",
    "canonical_threshold",
    "check_budget_name",
    "check_timezone",
    "current_window",
    "parse_limit_nanos",
    "parse_scope",
    "parse_thresholds",
    "percent_used",
    "scope_matches",
    "spent_from_state",
    "spent_in_window",
    "state_key",
    "window_state_key",
]
