"""The automatic trigger of a catalog update (``repricing.on_catalog_change``): blocking calls on a
clickhouse-connect client.

A process learns of a new catalog only when it starts with another genai-prices (``make
update-prices``, then a deploy): the pricing stage prices new events with it from then on, and the
query API, at start, compares the catalog it compiled with the fingerprint of the last catalog it
checked (:mod:`spendstream.repricing.catalog_changes`), stored as one row of ``reprice_jobs``
(tenant ``''``, id ``catalog``; no tenant is named ``''``). For the (provider, model) prices that
changed, in the periods they changed, it finds the tenants with such events and proposes, per
tenant, a re-price of that range: a dry run stored as a ``proposed`` job, exactly as the override
trigger does, applied on confirmation through the API (or at once when its spend change is at most
``repricing.auto_apply_max_usd``; query_api/routers/reprice.py). The fingerprint is saved after
the proposals, so a crash in between proposes again at the next start (confirming either proposal
makes the other a no-op). The first start ever only records the catalog: nothing to compare with.

Which tenants: those with events in the changed periods whose stored ``price_id`` is of a changed
model (a model re-priced or removed), or whose (provider, model) names now resolve to a changed
model (re-priced or added: e.g. events stored as ``unknown_model`` before the catalog knew it).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from spendstream.pricing.catalog import Catalog
from spendstream.repricing import jobs, store
from spendstream.repricing.catalog_changes import Change, Fingerprint, changes, fingerprint
from spendstream.repricing.planner import Scope

STATE_TENANT, STATE_ID = "", "catalog"
ACTOR = "auto:catalog"
_EPOCH = date(1970, 1, 1)


def load_state(client: Client) -> Fingerprint | None:
    job = store.load_job(client, STATE_TENANT, STATE_ID)
    return job.diff if job is not None and job.diff else None


def save_state(client: Client, fp: Fingerprint) -> None:
    store.save_job(
        client,
        store.Job(STATE_TENANT, STATE_ID, ACTOR, f"catalog genai-prices {fp['version']}", {}, "catalog", diff=fp),
    )


def _day(value: Any) -> date:
    return value.date() if isinstance(value, datetime) else value


def affected_ranges(
    client: Client, catalog: Catalog, found: list[Change]
) -> dict[str, tuple[date, date, list[Change]]]:
    """tenant -> (first day, day after the last, the changes its events meet)."""
    by_model: dict[str, list[Change]] = {}
    for change in found:
        by_model.setdefault(change.model, []).append(change)
    starts = [date.fromisoformat(c.start) if c.start else _EPOCH for c in found]
    ends = [date.fromisoformat(c.end) if c.end else date.max for c in found]
    lo, hi = min(starts), max(ends)
    params = {
        "lo": datetime.combine(lo, datetime.min.time(), UTC),
        "hi": datetime.combine(min(hi, date(2299, 12, 31)), datetime.min.time(), UTC),
    }
    seen: list[tuple[str, str, date, date]] = []  # tenant, model key, first day, last day
    for tenant, provider, model, first, last in client.query(
        "SELECT tenant, provider, model, min(bucket), max(bucket) FROM usage_daily "
        "WHERE bucket >= {lo:DateTime64(3, 'UTC')} AND bucket < {hi:DateTime64(3, 'UTC')} "
        "GROUP BY tenant, provider, model",
        parameters=params,
    ).result_rows:
        resolved = catalog.resolve(provider, model).model
        if resolved is not None:
            key = f"{resolved.provider_id}/{resolved.model_id}".lower()
            if key in by_model:
                seen.append((tenant, key, _day(first), _day(last)))
    for tenant, key, first, last in client.query(
        "SELECT tenant, lower(splitByChar('@', price_id)[1]) AS key, min(timestamp), max(timestamp) FROM usage_events "
        "WHERE timestamp >= {lo:DateTime64(3, 'UTC')} AND timestamp < {hi:DateTime64(3, 'UTC')} "
        "AND key IN {keys:Array(String)} GROUP BY tenant, key",
        parameters={**params, "keys": sorted(by_model)},
    ).result_rows:
        seen.append((tenant, key, _day(first), _day(last)))

    out: dict[str, tuple[date, date, list[Change]]] = {}
    for tenant, key, first, last in seen:
        for change in by_model[key]:
            start = max(first, date.fromisoformat(change.start) if change.start else _EPOCH)
            end = min(last + timedelta(days=1), date.fromisoformat(change.end) if change.end else date.max)
            if start >= end:
                continue
            lo_t, hi_t, met = out.get(tenant, (start, end, []))
            if change not in met:
                met.append(change)
            out[tenant] = (min(lo_t, start), max(hi_t, end), met)
    return out


def propose(
    client: Client, catalog: Catalog, *, batch_events: int, sample_size: int, now: datetime | None = None
) -> list[store.Job]:
    """Compare ``catalog`` with the last one checked; the re-prices it proposes (stored as
    ``proposed`` jobs with their dry-run diff, and audited), then remember ``catalog``."""
    new = fingerprint(catalog)
    old = load_state(client)
    proposed: list[store.Job] = []
    if old is not None and old["models"] != new["models"]:
        found = changes(old, new)
        now = now or datetime.now(UTC)
        for tenant, (start, end, met) in sorted(affected_ranges(client, catalog, found).items()):
            scope = Scope(
                tenant,
                datetime.combine(start, datetime.min.time(), UTC),
                min(datetime.combine(end, datetime.min.time(), UTC), now + timedelta(minutes=5)),
            )
            diff = jobs.dry_run(client, catalog, scope, batch_events=batch_events, sample_size=sample_size)
            if diff.events_changed == 0:
                continue
            models = ", ".join(sorted({c.model for c in met}))
            job = store.Job(
                tenant, jobs.new_job_id(), actor=ACTOR,
                reason=f"catalog update genai-prices {old['version']} -> {new['version']}: {models}"[:1000],
                scope={**scope.describe(), "catalog_changes": [c.describe() for c in met]},
                status=store.PROPOSED, diff=diff.to_json(),
            )  # fmt: skip
            job = store.save_job(client, job)
            store.audit(client, job, store.PROPOSED)
            proposed.append(job)
    if old is None or old != new:
        save_state(client, new)
    return proposed
