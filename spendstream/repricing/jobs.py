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
import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from clickhouse_connect.driver.client import Client

from spendstream.pricing.catalog import Catalog
from spendstream.pricing.overrides import OverrideBook, TenantOverrides
from spendstream.repricing import store
from spendstream.repricing.planner import ROW_COLUMNS, Diff, Scope


def new_job_id() -> str:
    """Sortable by creation time (the planner orders an event's corrections by job id)."""
    return f"rp{time.time_ns() // 1000:014x}{secrets.token_hex(4)}"


def tenant_overrides(client: Client, catalog: Catalog, tenant: str) -> TenantOverrides:
    return OverrideBook.from_rows(store.override_rows(client, tenant), catalog).for_tenant(tenant)


def dry_run(client: Client, catalog: Catalog, scope: Scope, *, batch_events: int, sample_size: int) -> Diff:
    """What applying would change, computed exactly as the apply does; nothing is written."""
    overrides = tenant_overrides(client, catalog, scope.tenant)
    diff = Diff(sample_size)
    for _, events in store.scan(client, scope, batch_events):
        diff.plan(events, catalog, overrides, job_id="")
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
) -> store.Job:
    """Apply ``job`` from its cursor to the end of its scope; the job's final state."""
    if job.status == store.DONE:
        return job
    scope = Scope.from_description(job.tenant, job.scope)
    overrides = tenant_overrides(client, catalog, job.tenant)
    diff = Diff.from_json(job.diff, sample_size) if job.diff else Diff(sample_size)
    if job.batches == 0 and job.diff is None:
        job = store.save_job(client, replace(job, status=store.RUNNING, diff=diff.to_json()))
        store.audit(client, job, "started")
    try:
        for cursor, events in store.scan(client, scope, batch_events, after=job.cursor, job_id=job.id):
            rows = diff.plan(events, catalog, overrides, job.id)
            batch = job.batches + 1
            store.insert_corrections(client, rows, batch_token(job.id, batch, rows))
            job = store.save_job(
                client, replace(job, status=store.RUNNING, cursor=cursor, batches=batch, diff=diff.to_json())
            )
            if after_batch is not None:
                after_batch(job)
    except Exception as exc:
        job = store.save_job(client, replace(job, status=store.FAILED, error=str(exc)[:1000]))
        store.audit(client, job, store.FAILED)
        raise
    job = store.save_job(client, replace(job, status=store.DONE, diff=diff.to_json(), error=""))
    store.audit(client, job, store.DONE)
    return job
