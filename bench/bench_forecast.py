"""Forecasts: accuracy, interval coverage and fit time of ``spendstream.insights.forecast`` on
synthetic daily spend series, and the time to forecast a tenant's 1,000 series.

    .venv/bin/python -m bench.bench_forecast [--series 240] [--holdout 14] [--seed 7]
                                             [--tenant-series 1000] [--workers 1] [--write-results]

Series (``--series``, at least 200 by default 240), lengths drawn from 14 to 400 days, shapes in
equal parts: weekly seasonality, linear trend (with weekly pattern), a step change in level, and
intermittent spend (most days zero); multiplicative noise. For each series the last
``--holdout`` days are held out and forecast from the rest (``forecast_series``, product
defaults: the method chosen by its own backtest, conformal bands once long enough).

Reported:
- MASE against SeasonalNaive(7): the forecast's mean absolute error on the held-out days divided
  by that of SeasonalNaive(7) on the same days (target: median < 1);
- coverage of the 80 % and 95 % daily bands over every held-out day (targets 75–85 % and 90–97 %),
  and of the horizon total's bands (one check per series);
- fit time per series (median, p95), and the chosen methods;
- ``--tenant-series``: ``--tenant-series`` series of 120 days forecast 30 days through
  ``query_api.insights.ForecastRunner`` with ``--workers`` processes as a ``by=`` forecast runs
  (the most expensive ``insights.forecast_full_groups`` fitted fully, the rest quick; the target
  is under a minute for 1,000 series).

``--write-results`` replaces the "Forecasts" section of bench/RESULTS.md. A smoke run:
``--series 12 --tenant-series 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import warnings

import numpy as np

from bench.stage_bench import machine, replace_section
from spendstream.insights.forecast import ForecastJob, SeriesInput, forecast_series

USD = 10**9
SHAPES = ("weekly", "trend", "step", "intermittent")


def synthetic(shape: str, days: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(days)
    level = rng.uniform(5, 200)
    weekly = 1 + rng.uniform(0.2, 0.8) * (t % 7 < 5)
    if shape == "weekly":
        mean = level * weekly
    elif shape == "trend":
        mean = level * weekly * (1 + rng.uniform(-0.002, 0.006) * t)
    elif shape == "step":
        step_at = rng.integers(days // 3, max(days // 3 + 1, days - 10))
        mean = level * weekly * np.where(t >= step_at, rng.uniform(0.4, 2.5), 1.0)
    else:
        mean = level * (rng.random(days) < rng.uniform(0.1, 0.4))
    noise = rng.lognormal(0, rng.uniform(0.05, 0.3), days)
    return np.clip(mean * noise, 0, None)


def seasonal_naive(history: np.ndarray, h: int) -> np.ndarray:
    last = history[-7:] if len(history) >= 7 else np.resize(history, 7)
    return np.resize(last, h)


def accuracy(n_series: int, holdout: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mase, fit_s, methods = [], [], {}
    inside = {80: 0, 95: 0}
    total_inside = {80: 0, 95: 0}
    days_checked = 0
    for i in range(n_series):
        shape = SHAPES[i % len(SHAPES)]
        days = int(rng.integers(14, 401))
        y = synthetic(shape, days + holdout, rng)
        history, actual = y[:days], y[days:]
        nanos = [int(v * USD) for v in history]
        started = time.perf_counter()
        f = forecast_series(nanos, holdout)
        fit_s.append(time.perf_counter() - started)
        methods[f.method] = methods.get(f.method, 0) + 1
        points = np.array([b.point for b in f.days]) / USD
        sn_error = np.mean(np.abs(seasonal_naive(history, holdout) - actual))
        error = np.mean(np.abs(points - actual))
        if sn_error > 0:
            mase.append(error / sn_error)
        for day, value in zip(f.days, actual * USD):
            days_checked += 1
            for k, level in enumerate((80, 95)):
                inside[level] += day.lo[k] <= value <= day.hi[k]
        total = actual.sum() * USD
        for k, level in enumerate((80, 95)):
            total_inside[level] += f.total.lo[k] <= total <= f.total.hi[k]
    fit_sorted = sorted(fit_s)
    return {
        "series": n_series,
        "mase_median": statistics.median(mase),
        "mase_mean": statistics.fmean(mase),
        "cover80": inside[80] / days_checked,
        "cover95": inside[95] / days_checked,
        "total80": total_inside[80] / n_series,
        "total95": total_inside[95] / n_series,
        "fit_median": statistics.median(fit_s),
        "fit_p95": fit_sorted[int(0.95 * (len(fit_sorted) - 1))],
        "methods": methods,
    }


def tenant_time(n_series: int, workers: int, seed: int) -> float:
    from query_api.insights import ForecastRunner
    from spendstream.settings import InsightsSettings

    rng = np.random.default_rng(seed)
    series = tuple(
        SeriesInput(f"s{i}", tuple(int(v * USD) for v in synthetic(SHAPES[i % 4], 120, rng))) for i in range(n_series)
    )
    runner = ForecastRunner(InsightsSettings(forecast_workers=workers, forecast_timeout_s=3600))
    try:
        pool = runner._get_pool()
        pool.map(len, [[]] * workers)  # workers started and warm before timing
        started = time.perf_counter()
        # as the API runs a by= forecast: the first forecast_full_groups series fitted fully, the rest quick
        job = ForecastJob(series=series, horizon=30, full_series=InsightsSettings().forecast_full_groups)
        results, _ = asyncio.run(runner.forecast("bench", job))
        assert len(results) == n_series
        return time.perf_counter() - started
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=240)
    parser.add_argument("--holdout", type=int, default=14)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tenant-series", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    acc = accuracy(args.series, args.holdout, args.seed)
    tenant = tenant_time(args.tenant_series, args.workers, args.seed) if args.tenant_series else None
    methods = ", ".join(f"{m} {n}" for m, n in sorted(acc["methods"].items()))
    report = (
        "## Forecasts\n\n"
        f"Measured {machine()} with `.venv/bin/python -m bench.bench_forecast --series {args.series} "
        f"--holdout {args.holdout} --tenant-series {args.tenant_series} --workers {args.workers}`.\n\n"
        "| what | result | target |\n|---|---|---|\n"
        f"| MASE vs SeasonalNaive(7), median ({acc['series']} series, 14–400 days) | {acc['mase_median']:.3f} "
        f"(mean {acc['mase_mean']:.3f}) | < 1 |\n"
        f"| daily 80 % band coverage, held-out days | {acc['cover80']:.1%} | 75–85 % |\n"
        f"| daily 95 % band coverage, held-out days | {acc['cover95']:.1%} | 90–97 % |\n"
        f"| horizon total 80 % / 95 % band coverage | {acc['total80']:.1%} / {acc['total95']:.1%} | |\n"
        f"| fit time per series (median / p95) | {acc['fit_median'] * 1000:.0f} ms / {acc['fit_p95'] * 1000:.0f} ms | |\n"
        + (
            f"| {args.tenant_series} series of 120 days, 30-day horizon, {args.workers} worker(s) | {tenant:.1f} s "
            "| < 60 s for 1,000 |\n"
            if tenant is not None
            else ""
        )
        + f"\nMethods chosen: {methods}.\n"
    )
    print(report)
    if args.write_results:
        replace_section("Forecasts", report)


if __name__ == "__main__":
    main()
