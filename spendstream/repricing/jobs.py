"""One re-pricing job: a dry run (the diff, nothing written) or an apply (the same diff, its
correction rows written batch by batch), resumable after a crash from its saved cursor.

Exactly once: batch ``n`` of job ``id`` is inserted with the token
``reprice:<id>:<n>:<digest of its rows>``. Rerunning a job (same id) resumes at the cursor saved
after the last finished batch; a batch whose insert landed before the crash reads back as already
corrected by this job (counted, not written again), and one whose insert was cut short by
ClickHouse is computed again from the same stored state, so it is the same rows under the same
token, which the table and every aggregate take at most once. A finished job reruns as a no-op.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client

from spendstream.budgets import Delta
from spendstream.budgets.store import load_budgets
from spendstream.pricing.catalog import Catalog
from spendstream.pricing.overrides import OverrideBook, TenantOverrides
from spendstream.repricing import store
from spendstream.repricing.budgets import BudgetImpact
from spendstream.repricing.planner import ROW_COLUMNS, Diff, Scope

T = TypeVar("T")


def new_job_id() -> str:
    """Sortable by creation time (the planner orders an event's corrections by job id)."""
    return f"rp{time.time_ns() // 1000:014x}{secrets.token_hex(4)}"


def tenant_overrides(client: Client, catalog: Catalog, tenant: str) -> TenantOverrides:
    return OverrideBook.from_rows(store.override_rows(client, tenant), catalog).for_tenant(tenant)


def budget_impact(client: Client, tenant: str, now: datetime | None = None) -> BudgetImpact:
    """The tenant's budgets as a job meets them now (spendstream/repricing/budgets.py)."""
    now = now or datetime.now(UTC)
    return BudgetImpact(tenant, load_budgets(client), int(now.timestamp() * 1000))


def dry_run(
    client: Client,
    catalog: Catalog,
    scope: Scope,
    *,
    batch_events: int,
    sample_size: int,
    progress: Callable[[Diff], None] | None = None,
) -> Diff:
    """What applying would change, computed exactly as the apply does; nothing is written. Its
    ``budgets`` lists the budget windows the change would reach (open) or leave alone (closed)."""
    overrides = tenant_overrides(client, catalog, scope.tenant)
    impact = budget_impact(client, scope.tenant)
    diff = Diff(sample_size)
    for _, events in store.scan(client, scope, batch_events):
        diff.plan(events, catalog, overrides, job_id="")
        impact.deltas(diff.changes, 0, diff.budgets)
        if progress is not None:
            progress(diff)
    return diff


def batch_token(job_id: str, batch: int, rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr([row[c] for c in ROW_COLUMNS]).encode())
    return f"reprice:{job_id}:{batch}:{digest.hexdigest()[:16]}"


def run(
    client: Client,
    catalog: Catalog,
    job: store.Job,
    *,
    batch_events: int,
    sample_size: int,
    after_batch: Callable[[store.Job], None] | None = None,
    publish: Callable[[list[Delta]], None] | None = None,
    scan_client: Client | None = None,
) -> store.Job:
    """Apply ``job`` from its cursor to the end of its scope; the job's final state. ``publish``
    sends the budget.deltas records of the tenant's open budget windows (budgets.DeltaPublisher);
    without it, budgets are not followed (the diff still lists the windows). ``scan_client`` (a
    second client): the next batch is read while this one is inserted (:func:`_read_ahead`)."""
    if job.status == store.DONE:
        return job
    scope = Scope.from_description(job.tenant, job.scope)
    overrides = tenant_overrides(client, catalog, job.tenant)
    impact = budget_impact(client, job.tenant)
    diff = Diff.from_json(job.diff, sample_size) if job.diff else Diff(sample_size)
    if job.batches == 0 and job.diff is None:
        diff.budget_seq = time.time_ns() // 1000 * 1000  # offsets of its budget.deltas: budgets.py
        job = store.save_job(client, replace(job, status=store.RUNNING, diff=diff.to_json(internal=True)))
        store.audit(client, job, "started")
    try:
        batches = store.scan(scan_client or client, scope, batch_events, after=job.cursor, job_id=job.id)
        for cursor, events in _read_ahead(batches) if scan_client is not None else batches:
            rows = diff.plan(events, catalog, overrides, job.id)
            batch = job.batches + 1
            deltas = impact.deltas(diff.changes, diff.budget_seq + batch, diff.budgets)
            if publish is not None:
                publish(deltas)  # before the rows: a batch sent twice is a replay the stage drops
            store.insert_corrections(client, rows, batch_token(job.id, batch, rows))
            job = store.save_job(
                client,
                replace(job, status=store.RUNNING, cursor=cursor, batches=batch, diff=diff.to_json(internal=True)),
            )
            if after_batch is not None:
                after_batch(job)
    except Exception as exc:
        job = store.save_job(client, replace(job, status=store.FAILED, error=str(exc)[:1000]))
        store.audit(client, job, store.FAILED)
        raise
    job = store.save_job(client, replace(job, status=store.DONE, diff=diff.to_json(internal=True), error=""))
    store.audit(client, job, store.DONE)
    return job


def _read_ahead(batches: Iterator[T]) -> Iterator[T]:
    """``batches``, each read by a thread while the caller handles the one before (at most one
    ahead). Safe for a job's scan: batch n+1 is the events after batch n's last key, which batch
    n's correction rows do not touch. The reader stops when the caller does."""
    ahead: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in batches:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # handed to the caller
            put((False, exc))

    reader = threading.Thread(target=read, name="reprice-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            more, item = ahead.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)
