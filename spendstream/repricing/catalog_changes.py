"""What a new price catalog changes: a compact fingerprint of a compiled catalog, and the
(provider, model) prices that differ between two fingerprints, with the periods they differ in.
Pure: no IO (spendstream/repricing/catalog_trigger.py stores the fingerprint and proposes the
re-prices).

A catalog model's schedule (spendstream/pricing/catalog.py) splits UTC dates at its price change
dates; each interval has a default row and maybe time-of-day windows. The fingerprint keeps, per
model (``"<provider id>/<model id>"``, the prefix of the ``price_id`` the pricing core stores), the
change dates and a digest per interval of everything an event of that interval is priced with:
the rows' price ids, tiers and integer rates, and the windows. Two fingerprints differ for a
model over the intervals (of the union of both sides' change dates) whose digests differ; a model
only on one side (added or removed) differs over all time. An event is re-priced iff its price
changes, so a period reported here is an upper bound of what the re-price corrects.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from spendstream.pricing.catalog import Catalog, PriceRow, PriceSchedule

#: a fingerprint: {"version": genai-prices version, "models": {key: [change dates, interval digests]}}
Fingerprint = dict[str, Any]


def _row(row: PriceRow) -> tuple[Any, ...]:
    return (row.price_id, row.scale, row.thresholds, row.bands)


def _intervals(schedule: PriceSchedule) -> list[str]:
    out = []
    for windows, default in zip(schedule.windows, schedule.defaults):
        text = repr((_row(default), [(w.start_us, w.end_us, _row(w.row)) for w in windows]))
        out.append(hashlib.sha256(text.encode()).hexdigest()[:16])
    return out


def fingerprint(catalog: Catalog) -> Fingerprint:
    """Every model's change dates and interval digests (JSON-able, ~60 bytes a model)."""
    models: dict[str, list[Any]] = {}
    for model in catalog.models():
        key = f"{model.provider_id}/{model.model_id}".lower()
        models.setdefault(key, [list(model.schedule.date_bounds), _intervals(model.schedule)])
    return {"version": catalog.version, "models": models}


@dataclass(frozen=True)
class Change:
    """One model's price differs in ``[start, end)`` (ISO dates, UTC; None = unbounded)."""

    model: str  # "<provider id>/<model id>", as price ids start
    start: str | None
    end: str | None
    kind: str  # "repriced" | "added" | "removed"

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "from": self.start, "to": self.end, "kind": self.kind}


def _digest_at(entry: list[Any], day: str | None) -> str:
    bounds, digests = entry
    return digests[0 if day is None else bisect_right(bounds, day)]


def changes(old: Fingerprint, new: Fingerprint) -> list[Change]:
    """The models whose prices differ, each changed period once (adjacent ones merged), by model."""
    before, after = old["models"], new["models"]
    out: list[Change] = []
    for key in sorted(before.keys() | after.keys()):
        if key not in before:
            out.append(Change(key, None, None, "added"))
            continue
        if key not in after:
            out.append(Change(key, None, None, "removed"))
            continue
        if before[key] == after[key]:
            continue
        starts: list[str | None] = [None, *sorted(set(before[key][0]) | set(after[key][0]))]
        period: list[str | None] | None = None
        for i, day in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else None
            if _digest_at(before[key], day) != _digest_at(after[key], day):
                if period is None:
                    period = [day, end]
                else:
                    period[1] = end
            elif period is not None:
                out.append(Change(key, period[0], period[1], "repriced"))
                period = None
        if period is not None:
            out.append(Change(key, period[0], period[1], "repriced"))
    return out
