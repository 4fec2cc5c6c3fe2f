"""Week-over-week and month-over-month change of cost, calls and cost per call. Pure.

A period compares the last ``days`` days with the ``days`` before them (7 for a week, 30 for a
month). Costs are exact nano-USD; cost per call is rounded half to even to a nano-USD; a percent
change is None when the earlier figure is 0 (growth from nothing has no percentage).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendstream.insights import usd
from spendstream.pricing.logic import round_half_even

PERIODS: dict[str, int] = {"week": 7, "month": 30}


def _per_call(cost: int, calls: int) -> int:
    return round_half_even(cost, calls) if calls else 0


def _percent(now: int, before: int) -> float | None:
    return round(100 * (now - before) / before, 2) if before else None


def figures(cost: int, calls: int) -> dict[str, Any]:
    return {"cost_usd": usd(cost), "calls": calls, "cost_per_call_usd": usd(_per_call(cost, calls))}


def change(current: tuple[int, int], previous: tuple[int, int]) -> dict[str, Any]:
    (cost, calls), (cost_before, calls_before) = current, previous
    per_call, per_call_before = _per_call(cost, calls), _per_call(cost_before, calls_before)
    return {
        "cost_usd": usd(cost - cost_before),
        "cost_percent": _percent(cost, cost_before),
        "calls": calls - calls_before,
        "calls_percent": _percent(calls, calls_before),
        "cost_per_call_usd": usd(per_call - per_call_before),
        "cost_per_call_percent": _percent(per_call, per_call_before),
    }


def movers(
    current: Mapping[str, tuple[int, int]], previous: Mapping[str, tuple[int, int]], limit: int
) -> list[dict[str, Any]]:
    """Groups of either period by the size of their cost change (largest first, ties by key)."""
    keys = set(current) | set(previous)
    ranked = sorted(
        keys,
        key=lambda k: (-abs(current.get(k, (0, 0))[0] - previous.get(k, (0, 0))[0]), k),
    )
    out = []
    for key in ranked[:limit]:
        now, before = current.get(key, (0, 0)), previous.get(key, (0, 0))
        out.append({"key": key, "current": figures(*now), "previous": figures(*before), "change": change(now, before)})
    return out
