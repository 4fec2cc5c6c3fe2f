"""The pure part of re-pricing: scope, new price of a stored event, correction rows, diff. No IO.

A stored event's *current* state is its original row of ``usage_events`` plus the correction
rows of every re-pricing since (0017_repricing.sql): its cost columns summed over those rows, and
the pricing fields of the newest row. :func:`reprice` prices the event again exactly as the
pricing stage does (``spendstream.pricing.price`` with the tenant's current overrides, which
apply by the event's own timestamp, as does the catalog's price history); when anything differs,
:func:`correction_rows` gives the two rows that move the event from its current state to the new
one: a ``reversal`` (current costs negated) and a ``repriced`` row (new costs). Client-priced
events (``price_source = 'client'``) keep the client's amount and are never re-priced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS
from spendstream.pricing.catalog import Catalog
from spendstream.pricing.logic import PricedLine, PricingError, price
from spendstream.pricing.overrides import TenantOverrides
from spendstream.timeutil import format_epoch_ms, format_timestamp

REVERSAL = "reversal"
REPRICED = "repriced"
#: usage_events' cost columns by class
COST_COLUMNS: dict[str, str] = {c: f"cost_{c}_nanos" for c in COST_CLASSES}
#: columns a correction row copies from the event it corrects
ATTRIBUTION: tuple[str, ...] = (
    "tenant", "project", "agent", "user", "session_id", "operation", "tags", "provider", "model", "status",
    "event_id", "timestamp", "received_at", "partition", "offset", "src_partition", "src_offset",
)  # fmt: skip
#: every column of a correction row, in insert order
ROW_COLUMNS: tuple[str, ...] = (
    *ATTRIBUTION, *TOKEN_FIELDS, "latency_ms", "cost_nanos", *COST_COLUMNS.values(),
    "price_id", "pricing_status", "price_source", "correction_id", "correction_kind",
)  # fmt: skip
#: the scope filters a request may set, besides tenant and time range
FILTERS: tuple[str, ...] = ("provider", "model", "project")


@dataclass(frozen=True)
class Scope:
    """The events a job re-prices: one tenant, ``start <= timestamp < end``, optional filters."""

    tenant: str
    start: datetime
    end: datetime
    provider: str | None = None
    model: str | None = None
    project: str | None = None

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("to must be after from")

    def filters(self) -> dict[str, str]:
        return {name: value for name in FILTERS if (value := getattr(self, name))}

    def describe(self) -> dict[str, Any]:
        return {"from": format_timestamp(self.start), "to": format_timestamp(self.end), **self.filters()}

    @classmethod
    def from_description(cls, tenant: str, described: dict[str, Any]) -> Scope:
        def instant(text: str) -> datetime:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)

        return cls(tenant, instant(described["from"]), instant(described["to"]), *(described.get(f) for f in FILTERS))


@dataclass(frozen=True)
class StoredEvent:
    """An event's current state in usage_events (original row + corrections)."""

    attribution: dict[str, Any]
    tokens: dict[str, int]
    cost: dict[str, int]  # COST_CLASSES -> nano-USD, current
    cost_nanos: int
    price_id: str
    pricing_status: str
    price_source: str
    #: set when the running job corrected this event already (it crashed after that batch's
    #: insert): the event's cost before the job, so the job's diff still counts it
    before_job: int | None = None

    @property
    def line(self) -> PricedLine:
        return PricedLine(dict(self.cost), self.cost_nanos, self.price_id, self.pricing_status, self.price_source)

    def pricing_input(self) -> dict[str, Any]:
        """The event as the pricing core reads it (contract v1 field names, RFC 3339 timestamp)."""
        return {
            "provider": self.attribution["provider"],
            "model": self.attribution["model"],
            "timestamp": format_timestamp(self.attribution["timestamp"]),
            **self.tokens,
        }


def reprice(event: StoredEvent, catalog: Catalog, overrides: TenantOverrides | None) -> PricedLine | None:
    """The event's price today, or None when it stays as stored (same price, or client-priced)."""
    if event.price_source == "client":
        return None
    try:
        line = price(event.pricing_input(), catalog, overrides)
    except PricingError:
        # the stage stored it, so it priced; a contract change since leaves the row as it is
        return None
    return None if line == event.line else line


def correction_rows(event: StoredEvent, new: PricedLine, job_id: str) -> list[dict[str, Any]]:
    """The reversal of the event's current costs and the re-priced row: one insert holds both."""
    base = {**event.attribution, **dict.fromkeys(TOKEN_FIELDS, 0), "latency_ms": None, "correction_id": job_id}
    reversal = {
        **base,
        "cost_nanos": -event.cost_nanos,
        **{COST_COLUMNS[c]: -event.cost[c] for c in COST_CLASSES},
        "price_id": event.price_id,
        "pricing_status": event.pricing_status,
        "price_source": event.price_source,
        "correction_kind": REVERSAL,
    }
    repriced = {
        **base,
        "cost_nanos": new.cost_nanos,
        **{COST_COLUMNS[c]: new.cost[c] for c in COST_CLASSES},
        "price_id": new.price_id,
        "pricing_status": new.pricing_status,
        "price_source": new.price_source,
        "correction_kind": REPRICED,
    }
    return [reversal, repriced]


def _new_totals() -> list[int]:
    return [0, 0, 0]  # events changed, old nano-USD, new nano-USD


@dataclass
class Diff:
    """What a job changes: events scanned and changed, old and new totals of the changed events,
    per (provider, model) and per UTC day, and the first ``sample_size`` changed events."""

    sample_size: int = 20
    events_scanned: int = 0
    events_changed: int = 0
    old_nanos: int = 0
    new_nanos: int = 0
    by_model: dict[str, list[int]] = field(default_factory=dict)
    by_day: dict[str, list[int]] = field(default_factory=dict)
    sample: list[dict[str, Any]] = field(default_factory=list)
    #: budget windows the changes count in: "<budget id>|<window start or 'rolling'>" ->
    #: [budget id, name, window, start ms, end ms | None, open, events, delta nano-USD]
    #: (spendstream/repricing/budgets.py)
    budgets: dict[str, list[Any]] = field(default_factory=dict)
    #: the offset base of this job's budget.deltas records (0 until it applies)
    budget_seq: int = 0
    #: the last planned batch's changes: (attribution, new - old nano-USD) per changed event
    changes: list[tuple[dict[str, Any], int]] = field(default_factory=list, repr=False)

    def add(self, event: StoredEvent, new: PricedLine | None, old: int | None = None) -> None:
        self.events_scanned += 1
        if new is None:
            return
        old = event.cost_nanos if old is None else old
        self.changes.append((event.attribution, new.cost_nanos - old))
        self.events_changed += 1
        self.old_nanos += old
        self.new_nanos += new.cost_nanos
        a = event.attribution
        for totals in (
            self.by_model.setdefault(f"{a['provider']}/{a['model']}", _new_totals()),
            self.by_day.setdefault(a["timestamp"].date().isoformat(), _new_totals()),
        ):
            totals[0] += 1
            totals[1] += old
            totals[2] += new.cost_nanos
        if len(self.sample) < self.sample_size:
            self.sample.append(
                {
                    "event_id": a["event_id"],
                    "timestamp": format_timestamp(a["timestamp"]),
                    "provider": a["provider"],
                    "model": a["model"],
                    "old": {"cost_nanos": old, "price_id": event.price_id, "pricing_status": event.pricing_status},
                    "new": {
                        "cost_nanos": new.cost_nanos,
                        "price_id": new.price_id,
                        "pricing_status": new.pricing_status,
                    },
                }
            )

    def plan(self, events: Iterable[StoredEvent], catalog: Catalog, overrides: TenantOverrides | None, job_id: str):
        """Add a batch of events; return the correction rows of those that change."""
        rows: list[dict[str, Any]] = []
        self.changes = []
        for event in events:
            new = reprice(event, catalog, overrides)
            if new is None and event.before_job is not None:
                # corrected by this very job before a crash: counted, not written again
                self.add(event, event.line, old=event.before_job)
                continue
            self.add(event, new)
            if new is not None:
                rows.extend(correction_rows(event, new, job_id))
        return rows

    def to_json(self, internal: bool = False) -> dict[str, Any]:
        """The API's answer: nano-USD as integers (exact), groups sorted by key; ``internal``
        adds what a job saves to continue (``budget_seq``)."""

        def groups(by: dict[str, list[int]], key: str) -> list[dict[str, Any]]:
            return [
                {key: name, "events": e, "old_nanos": o, "new_nanos": n, "delta_nanos": n - o}
                for name, (e, o, n) in sorted(by.items())
            ]

        return {
            "events_scanned": self.events_scanned,
            "events_changed": self.events_changed,
            "old_nanos": self.old_nanos,
            "new_nanos": self.new_nanos,
            "delta_nanos": self.new_nanos - self.old_nanos,
            "by_model": groups(self.by_model, "model"),
            "by_day": groups(self.by_day, "day"),
            "sample": self.sample,
            "budgets": [
                {
                    "budget_id": bid,
                    "name": name,
                    "window": window,
                    "window_start": format_epoch_ms(start),
                    "window_end": format_epoch_ms(end),
                    "events": n,
                    "delta_nanos": delta,
                    "state": "open: follows the correction" if is_open else "closed: left alone",
                }
                for bid, name, window, start, end, is_open, n, delta in (self.budgets[k] for k in sorted(self.budgets))
            ],
        } | ({"budget_seq": self.budget_seq} if internal else {})

    @classmethod
    def from_json(cls, data: dict[str, Any], sample_size: int = 20) -> Diff:
        """A diff saved with a job (to_json), to continue adding to after a restart."""
        return cls(
            sample_size=sample_size,
            events_scanned=data["events_scanned"],
            events_changed=data["events_changed"],
            old_nanos=data["old_nanos"],
            new_nanos=data["new_nanos"],
            by_model={g["model"]: [g["events"], g["old_nanos"], g["new_nanos"]] for g in data["by_model"]},
            by_day={g["day"]: [g["events"], g["old_nanos"], g["new_nanos"]] for g in data["by_day"]},
            sample=list(data["sample"]),
            budgets={
                f"{b['budget_id']}|{'rolling' if b['window'].startswith('rolling') else _epoch_ms(b['window_start'])}": [
                    b["budget_id"], b["name"], b["window"], _epoch_ms(b["window_start"]), _epoch_ms(b["window_end"]),
                    b["state"].startswith("open"), b["events"], b["delta_nanos"],
                ]
                for b in data.get("budgets", [])
            },
            budget_seq=data.get("budget_seq", 0),
        )  # fmt: skip


def _epoch_ms(text: str | None) -> int | None:
    if text is None:
        return None
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
