"""A budget's standing in its current window, for the gateway's budget check and the query API's
budget status: spend, what is left, and whether an enforced budget still allows a call. Pure: no IO.

The gateway reads spend from the budgets stage's spendstream.budget.state records (one per
budget window, see :func:`window_state_key`); the query API sums it in ClickHouse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendstream.budgets.model import Budget
from spendstream.budgets.state import percent_used, state_key
from spendstream.budgets.windows import ROLLING_MS, current_window
from spendstream.contracts import nanos_to_usd_str
from spendstream.timeutil import format_epoch_ms


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
            "window_start": format_epoch_ms(self.window_start) if b.window != "total" else None,
            "window_end": format_epoch_ms(self.window_end),
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


def window_state_key(budget: Budget, window_start: int) -> bytes:
    """The budget.state key of ``budget``'s window starting at ``window_start`` (one key for a
    rolling window)."""
    return state_key(budget.id, "rolling" if budget.window in ROLLING_MS else window_start)
