"""spendstream.budgets.reservations: reserve before a call, settle after, split across replicas."""

from __future__ import annotations

from spendstream.budgets import Budget, BudgetStanding
from spendstream.budgets.reservations import Denial, Ledger, Reservation

HARD = Budget("t", "b1", "hard", {}, "monthly", "UTC", 1000, enforce=True)
SOFT = Budget("t", "b2", "soft", {}, "monthly", "UTC", 10, enforce=False)


def standing(budget: Budget, spent: int = 0) -> BudgetStanding:
    return BudgetStanding(budget, 0, None, spent)


def test_reserve_settle_release():
    ledger = Ledger()
    a = ledger.reserve([standing(HARD)], 600, now_ms=0)
    assert isinstance(a, Reservation) and ledger.held(("b1", 0)) == 600
    denied = ledger.reserve([standing(HARD)], 500, now_ms=0)
    assert isinstance(denied, Denial) and denied.held == 600 and "b1" in denied.message()
    ledger.settle(a, 250, now_ms=10)  # the real cost replaces the reservation
    assert ledger.held(("b1", 0)) == 250
    b = ledger.reserve([standing(HARD)], 700, now_ms=10)
    assert isinstance(b, Reservation)
    ledger.release(b)  # failed call: nothing held for it
    ledger.release(b)  # twice is harmless
    assert ledger.held(("b1", 0)) == 250 and ledger.open_reservations == 0


def test_settled_cost_is_held_until_the_state_shows_it():
    ledger = Ledger(settled_hold_ms=1000)
    r = ledger.reserve([standing(HARD)], 400, now_ms=0)
    ledger.settle(r, 400, now_ms=0)
    assert isinstance(ledger.reserve([standing(HARD, spent=0)], 700, now_ms=500), Denial)
    # after the hold, the budget's published spend carries it
    assert isinstance(ledger.reserve([standing(HARD, spent=400)], 600, now_ms=1001), Reservation)


def test_exhausted_budget_denies_any_call_and_soft_budgets_never_do():
    ledger = Ledger()
    assert isinstance(ledger.reserve([standing(HARD, spent=1000)], 0, now_ms=0), Denial)
    ok = ledger.reserve([standing(SOFT, spent=10_000)], 10**9, now_ms=0)
    assert isinstance(ok, Reservation) and ok.keys == () and ledger.open_reservations == 0


def test_replicas_split_what_is_left():
    a, b = Ledger(replicas=2), Ledger(replicas=2)
    assert isinstance(a.reserve([standing(HARD, 200)], 400, 0), Reservation)
    assert isinstance(a.reserve([standing(HARD, 200)], 1, 0), Denial)  # a's share (800 / 2) is used up
    assert isinstance(b.reserve([standing(HARD, 200)], 400, 0), Reservation)
    assert a.held(("b1", 0)) + b.held(("b1", 0)) <= 1000 - 200


def test_reservations_that_never_settle_expire():
    ledger = Ledger(ttl_ms=100)
    r = ledger.reserve([standing(HARD)], 900, now_ms=0)
    ledger.expire(now_ms=100)
    assert ledger.expired == 1 and ledger.held(("b1", 0)) == 0
    ledger.settle(r, 900, now_ms=150)  # a late settle of an expired reservation holds nothing twice
    assert ledger.held(("b1", 0)) == 0
