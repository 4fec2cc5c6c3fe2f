"""Re-pricing of stored usage and its audit trail (spendstream/repricing does the work).

``POST /v1/pricing/reprice`` (admin): ``dry_run`` (the default) answers the diff and writes
nothing; ``dry_run: false`` starts a job in this process and answers 202 with its id; ``GET
/v1/pricing/reprice/{id}`` shows its progress and, once done, its diff. One job per tenant at a
time (409 otherwise). A job whose process died is resumed by POSTing its ``job_id`` again once it
has made no progress for ``repricing.stale_after_s``; it continues from its saved cursor and its
batches are deduplicated, so the totals end exact. ``GET /v1/pricing/audit`` lists who re-priced
what, when and why, with the old and new totals.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from query_api.deps import Admin, Principal, Reader, SettingsDep
from query_api.errors import Conflict, InvalidField, NotFound
from query_api.filters import parse_instant, parse_tz
from spendstream.clickhouse import get_client
from spendstream.contracts import usd_to_nanos
from spendstream.repricing import catalog_trigger, jobs, store
from spendstream.repricing.budgets import DeltaPublisher
from spendstream.repricing.planner import Scope

router = APIRouter(prefix="/v1/pricing", tags=["pricing"])
log = logging.getLogger(__name__)

#: tenants with a job running in this process (ClickHouse's reprice_jobs covers other processes)
_running: set[str] = set()
_tasks: set[asyncio.Task] = set()


class RepriceIn(BaseModel):
    from_: str = Field(alias="from", description="RFC 3339 or YYYY-MM-DD (UTC); events at or after it")
    to: str = Field(description="RFC 3339 or YYYY-MM-DD (UTC), exclusive")
    provider: str | None = Field(None, min_length=1, max_length=128)
    model: str | None = Field(None, min_length=1, max_length=256)
    project: str | None = Field(None, min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=1000, description="why: kept in the audit trail")
    dry_run: bool = True
    job_id: str | None = Field(None, max_length=64, description="resume this job (after its process died)")


def _scope(body: RepriceIn, tenant: str) -> Scope:
    utc = parse_tz("UTC")
    start = parse_instant("from", body.from_, utc, end_of_day=False)
    end = parse_instant("to", body.to, utc, end_of_day=False)
    if end <= start:
        raise InvalidField("to", "must be after from")
    return Scope(tenant, start, end, body.provider, body.model, body.project)


def _sync(request: Request, fn, *args, **kwargs):
    """Run a blocking store call on a client of its own (clients are not shared across threads)."""

    def call():
        client = get_client(request.app.state.settings)
        try:
            return fn(client, *args, **kwargs)
        finally:
            client.close()

    return asyncio.to_thread(call)


@router.post("/reprice", summary="Re-price stored usage: dry run (the diff) or apply as a job (admin)")
async def reprice(body: RepriceIn, principal: Admin, request: Request, settings: SettingsDep) -> Any:
    tenant = principal.tenant
    options = {"batch_events": settings.repricing.batch_events, "sample_size": settings.repricing.sample_size}
    catalog = request.app.state.catalog
    if body.job_id:
        job = await _sync(request, store.load_job, tenant, body.job_id)
        if job is None:
            raise NotFound(f"re-pricing job {body.job_id!r}")
        if job.status == store.DONE:
            return job.describe()
        if job.status == store.PROPOSED:
            if body.dry_run:
                return job.describe()
            # confirmed: the apply computes its own diff from the start of the scope
            job = replace(job, actor=principal.key_id or job.actor, diff=None, batches=0, cursor=store.START)
        age = (datetime.now(UTC) - job.updated_at).total_seconds()
        if tenant in _running or (job.status == store.RUNNING and age < settings.repricing.stale_after_s):
            raise Conflict(f"job {job.id} is running")
        return await _start(request, replace(job, status=store.RUNNING, error=""), options)
    scope = _scope(body, tenant)
    if body.dry_run:
        diff = await _sync(request, jobs.dry_run, catalog, scope, **options)
        return {"dry_run": True, "scope": scope.describe(), "diff": diff.to_json(), **_budget_note()}
    running = await _sync(request, store.list_jobs, tenant, store.RUNNING)
    fresh = [
        j for j in running if (datetime.now(UTC) - j.updated_at).total_seconds() < settings.repricing.stale_after_s
    ]
    if tenant in _running or fresh:
        raise Conflict("a re-pricing job of this tenant is running; one at a time")
    job = store.Job(tenant, jobs.new_job_id(), actor=principal.key_id or "", reason=body.reason, scope=scope.describe())
    return await _start(request, job, options)


def _budget_note() -> dict[str, str]:
    return {
        "budgets": "budget windows still open follow the correction (thresholds it crosses alert as usual, none "
        "twice); closed windows are left alone; diff.budgets lists each window met and its state"
    }


async def _start(request: Request, job: store.Job, options: dict[str, int]) -> JSONResponse:
    tenant = job.tenant
    _running.add(tenant)
    try:  # stored before the answer, so GET finds it at once
        job = await _sync(request, store.save_job, job)
    except Exception:
        _running.discard(tenant)
        raise

    async def work() -> None:
        settings = request.app.state.settings
        publish = DeltaPublisher(settings)  # open budget windows follow (budgets.py)

        def run(client, catalog, job):
            scan_client = get_client(settings)  # reads the next batch while one is inserted
            try:
                return jobs.run(client, catalog, job, publish=publish, scan_client=scan_client, **options)
            finally:
                scan_client.close()

        try:
            await _sync(request, run, request.app.state.catalog, job)
        except Exception:
            log.exception("re-pricing job %s failed", job.id)
        finally:
            _running.discard(tenant)
            await asyncio.to_thread(publish.close)

    task = asyncio.create_task(work())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return JSONResponse({**job.describe(), **_budget_note()}, status_code=202)


@router.get("/reprice/{job_id}", summary="A re-pricing job: status, progress, diff")
async def reprice_job(principal: Reader, request: Request, job_id: Annotated[str, Path(max_length=64)]) -> dict:
    job = await _sync(request, store.load_job, principal.tenant, job_id)
    if job is None:
        raise NotFound(f"re-pricing job {job_id!r}")
    return job.describe()


@router.get("/audit", summary="Re-pricings: who, when, why, scope, old and new totals (nano-USD)")
async def pricing_audit(principal: Reader, request: Request) -> dict:
    return {"audit": await _sync(request, store.read_audit, principal.tenant)}


async def propose_after_override_change(
    request: Request, principal: Principal, override_id: str, since: datetime, what: str
) -> dict[str, Any] | None:
    """The automatic trigger of a price override change (``repricing.on_override_change``): a dry
    run of the tenant's events since ``since`` (the earliest effective_from involved) in the
    background, stored as a ``proposed`` job, or applied at once when its spend change is at most
    ``repricing.auto_apply_max_usd``. The range is not narrowed to the override's model: an
    override also covers the catalog aliases of its model (spendstream/pricing/overrides.py), and
    only events whose price changes are corrected anyway."""
    settings = request.app.state.settings
    if not settings.repricing.on_override_change:
        return None
    tenant = principal.tenant
    scope = Scope(tenant, since, datetime.now(UTC) + timedelta(minutes=5))
    job = store.Job(
        tenant, jobs.new_job_id(), actor=f"auto:{principal.key_id}", reason=f"price override {override_id} {what}",
        scope=scope.describe(), status=store.PROPOSED,
    )  # fmt: skip
    options = {"batch_events": settings.repricing.batch_events, "sample_size": settings.repricing.sample_size}
    limit = usd_to_nanos(settings.repricing.auto_apply_max_usd)

    async def propose() -> None:
        try:
            diff = await _sync(request, jobs.dry_run, request.app.state.catalog, scope, **options)
            if diff.events_changed == 0:
                return
            proposed = await _sync(request, store.save_job, replace(job, diff=diff.to_json()))
            await _sync(request, store.audit, proposed, store.PROPOSED)
            if limit and abs(diff.new_nanos - diff.old_nanos) <= limit and tenant not in _running:
                await _start(request, replace(proposed, status=store.RUNNING, diff=None), options)
        except Exception:
            log.exception("re-pricing proposal %s failed", job.id)

    task = asyncio.create_task(propose())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return {"job_id": job.id, "status": "proposing", "scope": scope.describe()}


def propose_after_catalog_change(app: Any) -> asyncio.Task | None:
    """The automatic trigger of a catalog update (``repricing.on_catalog_change``), started once
    the app has compiled its catalog: in the background, compare it with the last catalog checked
    and store a ``proposed`` job per affected tenant (spendstream/repricing/catalog_trigger.py);
    a proposal whose spend change is at most ``repricing.auto_apply_max_usd`` is applied at once."""
    settings = app.state.settings
    if not settings.repricing.on_catalog_change:
        return None
    holder = SimpleNamespace(app=app)  # what _sync and _start read of a request
    options = {"batch_events": settings.repricing.batch_events, "sample_size": settings.repricing.sample_size}
    limit = usd_to_nanos(settings.repricing.auto_apply_max_usd)

    async def check() -> None:
        try:
            proposed = await _sync(holder, catalog_trigger.propose, app.state.catalog, **options)
            for job in proposed:
                delta = abs(job.diff["new_nanos"] - job.diff["old_nanos"]) if job.diff else 0
                if limit and delta <= limit and job.tenant not in _running:
                    await _start(holder, replace(job, status=store.RUNNING, diff=None), options)
        except Exception:
            log.exception("re-pricing proposal after a catalog update failed")

    task = asyncio.create_task(check())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task
