"""Hard budgets at the proxy: reserve a call's maximum cost before it is forwarded, settle it to
the real cost when it ends. Pure: no IO; the gateway's proxy owns one ``Ledger`` per process.

What a budget has left is ``limit - spent``, ``spent`` being what the budgets stage last published
on spendstream.budget.state (the gateway's BudgetView). Each of ``replicas`` gateway processes may
hold at most ``(limit - spent) / replicas`` of it locally: the reservations of calls in flight
plus the cost of calls it settled in the last ``settled_hold_ms`` (until the pipeline's
state shows them; meanwhile they count twice, which only denies earlier). A call is denied when
its reservation does not fit the allowance of one of the enforced budgets matching it. The
allowances of all replicas add up to ``limit - spent``, so no interleaving of calls across
replicas reserves more than a budget has left.

Spend can still pass the limit (the bound documented in docs/proxy.md) only when:
- a call costs more than its reservation (the reservation is an upper bound by construction;
  tenant price overrides above the catalog price are the exception);
- a settled cost reaches budget.state later than ``settled_hold_ms`` after the call ended;
- more processes enforce than ``replicas`` says: k processes against a setting of r reserve up to
  ``k / r`` of what is left.
A reservation whose call never settles (a bug, a hung task) is released after ``ttl_ms``.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from spendstream.budgets.standing import BudgetStanding
from spendstream.contracts import nanos_to_usd_str

#: (budget id, window start): what a reservation holds against
WindowKey = tuple[str, int]


@dataclass(slots=True)
class Reservation:
    id: int
    keys: tuple[WindowKey, ...]
    amount: int
    expires_ms: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class Denial:
    standing: BudgetStanding
    #: what this process may still reserve against the budget
    allowance: int
    held: int
    estimate: int

    def message(self) -> str:
        b = self.standing.budget
        return (
            f"Budget '{b.name}' ({b.id}) is exhausted for this call: spent {nanos_to_usd_str(self.standing.spent)} "
            f"of {nanos_to_usd_str(b.limit_nanos)} USD in its {b.window} window, "
            f"{nanos_to_usd_str(self.held)} held by calls in flight here, this call may cost up to "
            f"{nanos_to_usd_str(self.estimate)} USD."
        )


class Ledger:
    def __init__(self, replicas: int = 1, settled_hold_ms: int = 30_000, ttl_ms: int = 900_000):
        self.replicas = max(1, replicas)
        self.settled_hold_ms = settled_hold_ms
        self.ttl_ms = ttl_ms
        self._held: dict[WindowKey, int] = {}
        self._open: dict[int, Reservation] = {}
        self._settled: deque[tuple[int, tuple[WindowKey, ...], int]] = deque()
        self._ids = itertools.count(1)
        self.expired = 0

    def held(self, key: WindowKey) -> int:
        return self._held.get(key, 0)

    @property
    def open_reservations(self) -> int:
        return len(self._open)

    def allowance(self, standing: BudgetStanding) -> int:
        left = max(0, standing.budget.limit_nanos - standing.spent)
        return left // self.replicas

    def reserve(self, standings: Iterable[BudgetStanding], estimate: int, now_ms: int) -> Reservation | Denial:
        """Hold ``estimate`` against every enforced budget of ``standings``, or the first that denies."""
        self.expire(now_ms)
        keys = []
        for s in standings:
            if not s.budget.enforce:
                continue  # soft budgets only alert
            key = (s.budget.id, s.window_start)
            held = self._held.get(key, 0)
            allowance = self.allowance(s)
            if s.spent >= s.budget.limit_nanos or held + estimate > allowance:
                return Denial(s, allowance, held, estimate)
            keys.append(key)
        reservation = Reservation(next(self._ids), tuple(keys), estimate, now_ms + self.ttl_ms)
        if keys:
            self._add(reservation.keys, estimate)
            self._open[reservation.id] = reservation
        return reservation

    def settle(self, reservation: Reservation, cost: int, now_ms: int) -> None:
        """The call ended costing ``cost``: its reservation becomes the real cost, kept for
        ``settled_hold_ms`` (until budget.state shows it)."""
        if not self._close(reservation):
            return
        if cost > 0:
            self._add(reservation.keys, cost)
            self._settled.append((now_ms + self.settled_hold_ms, reservation.keys, cost))

    def release(self, reservation: Reservation) -> None:
        """The call failed before costing anything (or its cost is unknown and recorded elsewhere)."""
        self._close(reservation)

    def expire(self, now_ms: int) -> None:
        settled = self._settled
        while settled and settled[0][0] <= now_ms:
            _, keys, cost = settled.popleft()
            self._add(keys, -cost)
        if self._open:
            for reservation in [r for r in self._open.values() if r.expires_ms <= now_ms]:
                self.expired += 1
                self._close(reservation)

    def _close(self, reservation: Reservation) -> bool:
        if reservation.done:
            return False
        reservation.done = True
        if self._open.pop(reservation.id, None) is None:
            return False  # held nothing (no enforced budget), or expired already
        self._add(reservation.keys, -reservation.amount)
        return True

    def _add(self, keys: tuple[WindowKey, ...], amount: int) -> None:
        held = self._held
        for key in keys:
            value = held.get(key, 0) + amount
            if value:
                held[key] = value
            else:
                del held[key]
