"""One collection run: for a connection and one dataset, plan the window, fetch every page, write
each page's buckets, then record the run (with its new watermark when it succeeded).

A failing run (HTTP error after retries, a page that breaks the documented shape, ClickHouse down)
is recorded with ``status='error'`` and its masked message; its watermark is not advanced, so the
next run starts where the last good one ended (at most 48 h back anyway) and recovers. Pages
already written by the failed run are complete buckets with a newer version: harmless, the next
run writes them again. Runs of one connection never overlap in a process (a lock per connection;
a run that finds it taken is skipped and recorded as ``skipped``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from spendstream.collectors import store, windows
from spendstream.collectors.connections import OpenConnection
from spendstream.collectors.http import HttpPolicy, ReportClient
from spendstream.collectors.registry import PROVIDERS, Dataset

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(connection_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(connection_id, threading.Lock())


@dataclass(frozen=True)
class CollectOptions:
    base_urls: dict[str, str]
    policy: HttpPolicy = HttpPolicy()
    recollect: timedelta = windows.DEFAULT_RECOLLECT
    transport: httpx.BaseTransport | None = None  # tests: a fake provider in process
    sleep: Callable[[float], None] = time.sleep


def collect(
    ch: Any,
    connection: OpenConnection,
    dataset: Dataset,
    options: CollectOptions,
    *,
    trigger: str = "schedule",
    now: datetime | None = None,
    backfill_days: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run one collection and return its record (also stored in ``collector_runs``).

    ``backfill_days`` collects that many days back instead of from the watermark; ``progress`` is
    called with (buckets done, buckets in the window) after every page."""
    now = now or datetime.now(UTC)
    started = datetime.now(UTC)
    run: dict[str, Any] = {
        "tenant": connection.tenant, "connection_id": connection.id, "provider": connection.provider,
        "dataset": dataset.kind, "run_id": store.new_run_id(), "trigger": trigger, "started_at": started,
        "finished_at": started, "status": "ok", "window_start": now, "window_end": now, "watermark": now,
        "buckets": 0, "rows": 0, "pages": 0, "retries": 0, "error": "",
    }  # fmt: skip
    lock = _lock(connection.id)
    if not lock.acquire(blocking=False):
        run["status"] = "skipped"
        run["error"] = "a run of this connection was still going"
        store.record_run(ch, run)
        return run
    try:
        _collect(ch, connection, dataset, options, run, now, backfill_days, progress)
    except Exception as exc:  # HTTP, page shape, ClickHouse: recorded (masked), the next run recovers
        run["status"] = "error"
        run["error"] = _masked(f"{type(exc).__name__}: {exc}", connection.admin_key)[:2000]
    finally:
        lock.release()
    run["finished_at"] = datetime.now(UTC)
    if run["status"] == "error":
        log.warning("collector run %s (%s %s) failed: %s", run["run_id"], connection.id, dataset.kind, run["error"])
    store.record_run(ch, run)
    return run


def _masked(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _collect(
    ch: Any,
    connection: OpenConnection,
    dataset: Dataset,
    options: CollectOptions,
    run: dict[str, Any],
    now: datetime,
    backfill_days: int | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    provider = PROVIDERS[connection.provider]
    if backfill_days is not None:
        window = windows.backfill(now, backfill_days, dataset.bucket_seconds)
    else:
        mark = store.watermark(ch, connection.tenant, connection.id, dataset.kind)
        window = windows.plan(now, mark, connection.backfill_days, dataset.bucket_seconds, options.recollect)
    run.update(window_start=window.start, window_end=window.end, watermark=window.watermark)
    total = window.buckets(dataset.bucket_seconds)
    version = time.time_ns() // 1_000
    http = ReportClient(
        options.base_urls[connection.provider],
        provider.headers(connection.admin_key),
        connection.admin_key,
        options.policy,
        sleep=options.sleep,
        transport=options.transport,
    )
    with http:
        try:
            for page in http.pages(dataset.path, dataset.params(window.start, window.end), dataset.parse):
                run["pages"] += 1
                run["rows"] += store.insert_buckets(
                    ch, dataset.kind, connection.tenant, connection.id, connection.provider, page.buckets, version
                )
                run["buckets"] += len(page.buckets)
                if progress is not None:
                    progress(run["buckets"], total)
        finally:
            run["retries"] = http.retries


def options_from_settings(settings: Any, **overrides: Any) -> CollectOptions:
    """The collect options of ``settings.collectors`` (``overrides``: e.g. a test's ``sleep``)."""
    c = settings.collectors
    policy = HttpPolicy(
        timeout_s=c.timeout_s,
        max_attempts=c.max_attempts,
        backoff_base_s=c.backoff_base_s,
        backoff_max_s=c.backoff_max_s,
        max_retry_after_s=c.max_retry_after_s,
        max_response_bytes=c.max_response_bytes,
    )
    base_urls = {"openai": c.openai_base_url, "anthropic": c.anthropic_base_url}
    return CollectOptions(base_urls, policy, timedelta(hours=c.recollect_hours), **overrides)


def is_running(connection_id: str) -> bool:
    """A run of this connection is going in this process."""
    with _locks_guard:
        lock = _locks.get(connection_id)
    return lock is not None and lock.locked()
