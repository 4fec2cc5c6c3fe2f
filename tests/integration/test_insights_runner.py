"""The forecast runner: fits in worker processes, a deadline, one forecast per tenant at a time,
and a cache keyed by the data."""

from __future__ import annotations

import asyncio
import time

import pytest

from query_api.insights import ForecastBusy, ForecastRunner, ForecastUnavailable
from spendstream.insights.forecast import ForecastJob, SeriesInput
from spendstream.settings import InsightsSettings

USD = 10**9


def job(n_series: int, days: int = 120, horizon: int = 30) -> ForecastJob:
    history = tuple((10 + 5 * (d % 7 < 5) + (d * 7919 % 13) / 10) * USD for d in range(days))
    return ForecastJob(series=tuple(SeriesInput(f"s{i}", tuple(int(v) + i for v in history)) for i in range(n_series)),
                       horizon=horizon)  # fmt: skip


@pytest.fixture(scope="module")
def runner():
    r = ForecastRunner(InsightsSettings(forecast_timeout_s=4.0, forecast_cache_entries=8))
    started = time.perf_counter()
    r._get_pool().apply(len, ([],))  # spawn the worker (statsforecast imported by its initializer)
    print(f"worker started in {time.perf_counter() - started:.2f} s")
    yield r
    r.close()


def test_forecasts_run_in_a_worker_and_are_cached_by_data(runner):
    async def main():
        first, cached = await runner.forecast("t1", job(2, days=60, horizon=7))
        again, cached_again = await runner.forecast("t1", job(2, days=60, horizon=7))
        other, cached_other = await runner.forecast("t1", job(2, days=61, horizon=7))  # new data: a new fit
        return first, cached, again, cached_again, cached_other

    first, cached, again, cached_again, cached_other = asyncio.run(main())
    assert len(first) == 2 and (cached, cached_again, cached_other) == (False, True, False)
    assert again == first


def test_one_forecast_per_tenant_and_a_deadline(runner):
    async def main():
        big = asyncio.create_task(runner.forecast("busy", job(400)))
        await asyncio.sleep(0.2)
        with pytest.raises(ForecastBusy):
            await runner.forecast("busy", job(1, days=30, horizon=7))
        started = time.monotonic()
        with pytest.raises(ForecastUnavailable):
            await big
        return time.monotonic() - started

    waited = asyncio.run(main())
    assert waited < 4.0 + 5.0  # the deadline, plus at most the kill grace
    # the worker is usable afterwards
    results, _ = asyncio.run(runner.forecast("busy", job(1, days=30, horizon=7)))
    assert len(results) == 1


def test_a_pool_restart_fails_the_queued_chunks_at_once():
    runner = ForecastRunner(InsightsSettings(forecast_warm_up=False))

    async def main():
        queued = asyncio.get_running_loop().create_future()
        runner._pending.add(queued)
        await asyncio.to_thread(runner._restart)
        with pytest.raises(ForecastUnavailable):
            await asyncio.wait_for(queued, 2)

    asyncio.run(main())


def test_the_cache_is_bounded_in_answers_and_series(monkeypatch):
    import query_api.insights as insights

    monkeypatch.setattr(insights, "CACHE_MAX_SERIES", 10)
    runner = ForecastRunner(InsightsSettings(forecast_warm_up=False, forecast_cache_entries=3))
    for i in range(5):
        runner._store(f"k{i}", [None] * 2)
    assert list(runner._cache) == ["k2", "k3", "k4"]  # entries: the oldest go first
    runner._store("big", [None] * 8)
    assert list(runner._cache) == ["k4", "big"] and runner._cached_series == 10  # series
    runner._store("huge", [None] * 11)  # never cached
    assert "huge" not in runner._cache


def test_background_warm_up_starts_the_workers():
    runner = ForecastRunner(InsightsSettings())
    try:
        runner.start_background()
        deadline = time.monotonic() + 60
        while runner.warm_seconds is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runner.warm_seconds is not None and runner._pool is not None
        print(f"forecast worker spawned and warm in {runner.warm_seconds:.2f} s")
    finally:
        runner.close()
