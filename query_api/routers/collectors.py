"""The collectors' jobs of the caller's tenant: one job per connection and dataset (``usage``,
``costs``), its schedule, watermark and last run; run history; and running a job now (admin).
The scheduled runs happen in the ``spendstream collectors`` service; a run started here happens
in this process, in a worker thread, under the same per-connection lock (never two at once here)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from query_api.deps import Admin, Reader
from query_api.errors import Conflict, DomainError, NotFound
from query_api.routers.provider_connections import SecretsNotConfigured, keyring
from spendstream.clickhouse import get_client
from spendstream.collectors import runner, store
from spendstream.collectors.connections import list_connections, load_open_connections
from spendstream.collectors.registry import PROVIDERS
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/v1/collectors", tags=["collectors"])
MAX_HISTORY = 500
#: manual runs going at once in this process, all tenants together: a tenant with many
#: connections cannot fill the API's threads with collections
MAX_MANUAL_RUNS = 4
_manual_runs = threading.BoundedSemaphore(MAX_MANUAL_RUNS)


class TooManyRuns(DomainError):
    status = 429
    code = "too_many_runs"

    def __init__(self) -> None:
        super().__init__(f"{MAX_MANUAL_RUNS} manual collector runs are already going; retry later", "job_id")
        self.headers = {"Retry-After": "30"}


def _run_view(run: dict[str, Any]) -> dict[str, Any]:
    return {k: iso_utc(v) if isinstance(v, datetime) else v for k, v in run.items() if k != "tenant"}


def _jobs(client: Any, settings: Any, tenant: str) -> list[dict[str, Any]]:
    runs = store.history(client, tenant, limit=MAX_HISTORY)
    jobs = []
    for conn in list_connections(client, tenant):
        schedule = getattr(settings.collectors, f"{conn['provider']}_schedule")
        for dataset in PROVIDERS[conn["provider"]].datasets:
            last = next((r for r in runs if r["connection_id"] == conn["id"] and r["dataset"] == dataset.kind), None)
            mark = store.watermark(client, tenant, conn["id"], dataset.kind)
            jobs.append({
                "id": f"{conn['id']}:{dataset.kind}", "connection_id": conn["id"], "provider": conn["provider"],
                "dataset": dataset.kind, "schedule": schedule, "watermark": iso_utc(mark) if mark else None,
                "running": runner.is_running(conn["id"]), "last_run": _run_view(last) if last else None,
            })  # fmt: skip
    return jobs


@router.get("/jobs", summary="Collector jobs: one per connection and dataset, with schedule and last run")
async def jobs(principal: Reader, request: Request) -> dict:
    settings = request.app.state.settings
    return {"jobs": await asyncio.to_thread(_jobs, request.app.state.ch_sync, settings, principal.tenant)}


@router.get("/status", summary="Per job: healthy (last run ok), failing, or never run")
async def status(principal: Reader, request: Request) -> dict:
    listed = await asyncio.to_thread(_jobs, request.app.state.ch_sync, request.app.state.settings, principal.tenant)
    out = []
    for job in listed:
        last = job["last_run"]
        state = "never_run" if last is None else ("ok" if last["status"] == "ok" else "failing")
        out.append({"id": job["id"], "state": state, "watermark": job["watermark"], "running": job["running"],
                    "last_error": last["error"] if last and last["status"] != "ok" else None})  # fmt: skip
    return {"jobs": out, "healthy": all(j["state"] != "failing" for j in out)}


@router.get("/history", summary="Collector runs, newest first: started, finished, buckets, errors")
async def history(
    principal: Reader,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY)] = 100,
    connection_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict:
    runs = await asyncio.to_thread(store.history, request.app.state.ch_sync, principal.tenant, limit, connection_id)
    return {"runs": [_run_view(r) for r in runs]}


@router.post("/jobs/{job_id}/run", status_code=202, summary="Run a job now (in the background); see /history")
async def run_now(job_id: str, principal: Admin, request: Request) -> dict:
    connection_id, _, kind = job_id.partition(":")
    settings = request.app.state.settings
    try:
        ring = keyring(request)
    except SecretsNotConfigured:
        # without a keyring no connection can have been stored, so no job exists
        raise NotFound(f"collector job {job_id[:80]!r}") from None
    found, _ = await asyncio.to_thread(
        load_open_connections, request.app.state.ch_sync, ring, tenant=principal.tenant, ids=[connection_id[:64]]
    )
    dataset = next((d for d in PROVIDERS[found[0].provider].datasets if d.kind == kind), None) if found else None
    if dataset is None:
        raise NotFound(f"collector job {job_id[:80]!r}")
    if runner.is_running(connection_id):
        raise Conflict("a run of this connection is going; see /v1/collectors/history", "job_id")
    if not _manual_runs.acquire(blocking=False):
        raise TooManyRuns()

    def run() -> None:
        try:
            client = get_client(settings)  # its own client: the run outlives this request
            try:
                runner.collect(client, found[0], dataset, runner.options_from_settings(settings), trigger="manual")
            finally:
                client.close()
        finally:
            _manual_runs.release()

    threading.Thread(target=run, name=f"collect-{job_id}", daemon=True).start()
    return {"job": job_id, "accepted_at": iso_utc(datetime.now(UTC))}
