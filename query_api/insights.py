"""Where forecasts are fitted: worker processes, per-tenant limits, a deadline and a cache.

Fits are CPU work (statsforecast, ≈ 0.05–0.7 s a series), so they never run on the event loop
nor in its threads: ``ForecastRunner`` hands each request's job to a ``multiprocessing`` pool of
``insights.forecast_workers`` spawned processes (started, and warmed with one fit, at start-up in
the background: importing statsforecast and the first fit take ≈ 1.5–3 s per process).

Bounds, so one tenant cannot stall the others:
- a tenant has at most one forecast in flight (a second answers 429 with Retry-After), and the
  runner holds at most ``2 * workers + 2`` jobs (429 beyond);
- a request's job is cut into chunks of :data:`CHUNK_SERIES` series submitted one after the
  other, so chunks of different tenants interleave in the pool's queue;
- every chunk carries the request's deadline (``insights.forecast_timeout_s``); the worker checks
  it between series and the request answers 503. A worker silent a grace period past the
  deadline is killed with its pool (``Pool.terminate``), the chunks queued behind it fail at once
  with 503 (retry), and a new pool starts.

Results are cached per (tenant, job): the job holds the history itself, so new data makes a new
key and the cache never answers with a forecast of old data. The cache holds at most
``insights.forecast_cache_entries`` answers and :data:`CACHE_MAX_SERIES` series in all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

from query_api.errors import DomainError
from spendstream.insights.forecast import ForecastJob, ForecastTimeout, SeriesForecast, run_job, warm_up
from spendstream.settings import InsightsSettings

log = logging.getLogger(__name__)

CHUNK_SERIES = 25
#: the cache's bound in series (a series' forecast is ≈ 10 KB with a 30-day horizon): ≈ 200 MB at most
CACHE_MAX_SERIES = 20_000
KILL_GRACE_S = 5.0


class ForecastBusy(DomainError):
    status = 429
    code = "too_many_forecasts"

    def __init__(self, message: str):
        super().__init__(message, None)
        self.headers = {"Retry-After": "5"}


class ForecastUnavailable(DomainError):
    status = 503
    code = "forecast_timeout"

    def __init__(self, message: str):
        super().__init__(message, None)
        self.headers = {"Retry-After": "10"}


def _warm() -> None:
    seconds = warm_up()
    logging.getLogger(__name__).info("forecast worker warm in %.2f s", seconds)


class ForecastRunner:
    def __init__(self, settings: InsightsSettings):
        self.settings = settings
        self._pool: Any = None
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._jobs = 0
        self._cache: OrderedDict[str, list[SeriesForecast]] = OrderedDict()
        self._cached_series = 0
        #: submitted chunks not yet answered: a pool restart fails them at once instead of leaving
        #: them to wait out their deadlines
        self._pending: set[asyncio.Future] = set()
        self.warm_seconds: float | None = None

    # -- the pool ----------------------------------------------------------------------------
    def _get_pool(self):
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = context.Pool(self.settings.forecast_workers, initializer=_warm)
            return self._pool

    def start_background(self) -> None:
        """Start (and warm) the workers without holding up start-up."""

        def start() -> None:
            started = time.perf_counter()
            try:
                self._get_pool().apply(warm_up)
                self.warm_seconds = time.perf_counter() - started
                log.info("forecast workers ready in %.2f s", self.warm_seconds)
            except Exception:  # noqa: BLE001 - the first request starts the pool again
                log.exception("forecast worker warm-up failed")

        threading.Thread(target=start, name="forecast-warm-up", daemon=True).start()

    def _restart(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
        for future in list(self._pending):
            error = ForecastUnavailable("the forecast workers were restarted; retry")
            future.get_loop().call_soon_threadsafe(lambda f=future, e=error: f.done() or f.set_exception(e))

    def close(self) -> None:
        self._restart()

    # -- the cache ---------------------------------------------------------------------------
    @staticmethod
    def cache_key(tenant: str, job: ForecastJob) -> str:
        return hashlib.sha256(pickle.dumps((tenant, job), protocol=5)).hexdigest()

    def cached(self, key: str) -> list[SeriesForecast] | None:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def _store(self, key: str, value: list[SeriesForecast]) -> None:
        if self.settings.forecast_cache_entries <= 0:
            return
        if len(value) > CACHE_MAX_SERIES:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        self._cached_series += len(value)
        while len(self._cache) > self.settings.forecast_cache_entries or self._cached_series > CACHE_MAX_SERIES:
            _, dropped = self._cache.popitem(last=False)
            self._cached_series -= len(dropped)

    # -- running -----------------------------------------------------------------------------
    async def forecast(self, tenant: str, job: ForecastJob) -> tuple[list[SeriesForecast], bool]:
        """The job's forecasts and whether they came from the cache."""
        key = self.cache_key(tenant, job)
        if (hit := self.cached(key)) is not None:
            return hit, True
        if self._in_flight.get(tenant, 0) >= 1:
            raise ForecastBusy("a forecast of this tenant is already running; retry when it has answered")
        if self._jobs >= 2 * self.settings.forecast_workers + 2:
            raise ForecastBusy("the forecast workers are busy; retry shortly")
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        self._jobs += 1
        try:
            deadline = time.time() + self.settings.forecast_timeout_s
            results: list[SeriesForecast] = []
            for start in range(0, len(job.series), CHUNK_SERIES):
                chunk = ForecastJob(
                    **{**job.__dict__, "series": job.series[start : start + CHUNK_SERIES], "offset": start}
                )
                results.extend(await self._submit(chunk, deadline))
        finally:
            self._jobs -= 1
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]
        self._store(key, results)
        return results, False

    async def _submit(self, job: ForecastJob, deadline: float) -> list[SeriesForecast]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(value: Any) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(value))

        def failed(exc: BaseException) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_exception(exc))

        pool = await asyncio.to_thread(self._get_pool)
        pool.apply_async(run_job, (job, deadline), callback=done, error_callback=failed)
        timeout = max(0.0, deadline - time.time()) + KILL_GRACE_S
        self._pending.add(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except ForecastTimeout as exc:
            raise ForecastUnavailable(
                f"the forecast took longer than {self.settings.forecast_timeout_s:g} s ({exc}); "
                "ask for fewer groups (limit) or a shorter horizon"
            ) from None
        except TimeoutError:
            log.warning("forecast worker silent past its deadline: restarting the pool")
            self._pending.discard(future)
            await asyncio.to_thread(self._restart)
            raise ForecastUnavailable("the forecast workers were restarted; retry") from None
        finally:
            self._pending.discard(future)
