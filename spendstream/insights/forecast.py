"""Daily spend forecasts with honest intervals. Pure: a series of daily costs in, bands out.

Method (per series, from its history of complete days, leading days without spend dropped):

``quick`` (the groups of a large ``by=`` forecast beyond the most expensive
``insights.forecast_full_groups``): OptimizedTheta (AutoTheta's optimised variant alone) or
SeasonalNaive(7) by the same backtest (OptimizedTheta alone under 14 days), with the models' own
bands: a fraction of the CPU of a full fit.

History: the last ``fit_days`` days (default :data:`DEFAULT_FIT_DAYS`, at most
:data:`MAX_FIT_DAYS`).

- fewer than :data:`MIN_MODEL_DAYS` days: ``run_rate``, the mean day, with a wide band from
  bootstrapped days times a log-normal level multiplier (sd :data:`RUN_RATE_SIGMA`): with a few
  days the level itself is uncertain, not only the day-to-day noise;
- :data:`MIN_MODEL_DAYS` to ``MIN_SEASONAL_DAYS - 1`` days: a non-seasonal model, AutoETS or
  AutoTheta (season length 1), whichever the backtest prefers;
- :data:`MIN_SEASONAL_DAYS` days or more: AutoETS, AutoTheta (season length 7) or
  SeasonalNaive(7), chosen by a rolling-origin backtest: up to :data:`BACKTEST_WINDOWS` origins,
  each forecasting the next ``min(horizon, BACKTEST_HORIZON_MAX)`` days (fewer for short series)
  from the days before it;
  the lowest mean absolute error wins (ties: the order above).

All models are Nixtla statsforecast's. Intervals at each level are the model's own and, once the
series holds :data:`CONFORMAL_MIN_WINDOWS` windows of the horizon's length, also the conformal ones
(``ConformalIntervals``, statsforecast's split-conformal over those rolling windows): the wider of
the two at each bound, since conformal bands from a handful of windows alone were measured to
cover too little on synthetic spend. The horizon's total and
the month-end projection are not sums of daily bands (the sum of 80 % bands is no 80 % band):
they are quantiles of the totals of :data:`N_PATHS` simulated paths (``model.simulate``).

Every figure is an integer nano-USD; bands are nested (lo95 <= lo80 <= point <= hi80 <= hi95)
and never below 0, enforced after the model (a model's symmetric band of a small series dips
below zero; spend cannot).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from spendstream.insights import usd
from spendstream.money import NANOS_PER_USD

LEVELS: tuple[int, ...] = (80, 95)
SEASON = 7
MIN_MODEL_DAYS = 7
MIN_SEASONAL_DAYS = 14
BACKTEST_WINDOWS = 2
BACKTEST_HORIZON_MAX = 14
#: conformal intervals need this many past windows of the horizon's length (statsforecast needs >= 2)
CONFORMAL_MIN_WINDOWS = 3
CONFORMAL_MAX_WINDOWS = 5
N_PATHS = 1000
RUN_RATE_SIGMA = 0.5
#: the longest history a model is fitted on by default (fit time grows with it; older days add
#: little to a daily spend forecast); ``fit_days`` changes it up to MAX_FIT_DAYS
DEFAULT_FIT_DAYS = 120
MAX_FIT_DAYS = 400
MAX_HORIZON = 92

RUN_RATE = "run_rate"
SEASONAL_CANDIDATES = ("AutoETS", "AutoTheta", "SeasonalNaive")
NONSEASONAL_CANDIDATES = ("AutoETS", "AutoTheta")
#: ``quick``: the cheap candidates (AutoETS is most of a fit's time) and the models' own bands
QUICK_SEASONAL_CANDIDATES = ("OptimizedTheta", "SeasonalNaive")
QUICK_NONSEASONAL_CANDIDATES = ("OptimizedTheta",)


@dataclass(frozen=True)
class Band:
    """A point and its interval at each level (levels ascending), in nano-USD."""

    point: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    def fields(self, levels: Sequence[int]) -> dict[str, str]:
        out = {"point_usd": usd(self.point)}
        for level, lo, hi in zip(levels, self.lo, self.hi):
            out[f"lo_{level}_usd"] = usd(lo)
            out[f"hi_{level}_usd"] = usd(hi)
        return out


@dataclass(frozen=True)
class SeriesForecast:
    method: str
    #: days of history the method used (from the first day with spend, at most MAX_FIT_DAYS)
    history_days: int
    #: "conformal", "model" (the model's own), or "bootstrap" (run_rate)
    intervals: str
    levels: tuple[int, ...]
    days: tuple[Band, ...]
    total: Band
    month_end: Band | None = None
    #: candidate -> mean absolute error per day in USD over the backtest (empty without one)
    backtest_mae: dict[str, float] = field(default_factory=dict)


def nest(point: int, lo: Sequence[int], hi: Sequence[int]) -> Band:
    """The band made nested and non-negative: each lower bound at most the next inner one (the
    point innermost), each upper bound at least the next inner one, nothing below 0."""
    point = max(0, point)
    los, his = [], []
    inner_lo, inner_hi = point, point
    for low, high in zip(lo, hi):  # levels ascending: inner to outer
        inner_lo = max(0, min(low, inner_lo))
        inner_hi = max(high, inner_hi)
        los.append(inner_lo)
        his.append(inner_hi)
    return Band(point, tuple(los), tuple(his))


def _nanos(values: np.ndarray) -> list[int]:
    return [int(round(float(v) * NANOS_PER_USD)) for v in values]


def _path_band(points: list[int], path_sums: np.ndarray, levels: Sequence[int], offset: int = 0) -> Band:
    """``offset + sum(points)`` with an interval from simulated paths: the quantiles of the point
    total plus each path's deviation from the paths' mean total (so the paths give the spread,
    day-to-day correlation included, and the model's point the centre), at least 0."""
    point_usd = sum(points) / NANOS_PER_USD
    samples = np.clip(point_usd + (path_sums - path_sums.mean()), 0.0, None) if len(path_sums) else np.zeros(1)
    lo, hi = [], []
    for level in levels:
        tail = (100 - level) / 200
        low, high = _nanos(np.quantile(samples, [tail, 1 - tail]))
        lo.append(offset + low)
        hi.append(offset + high)
    return nest(offset + sum(points), lo, hi)


def _model(name: str, seasonal: bool, conformal_h: int | None = None, conformal_windows: int = 0):
    from statsforecast.models import AutoETS, AutoTheta, OptimizedTheta, SeasonalNaive
    from statsforecast.utils import ConformalIntervals

    intervals = ConformalIntervals(h=conformal_h, n_windows=conformal_windows) if conformal_h else None
    season = SEASON if seasonal else 1
    if name == "AutoETS":
        # additive errors only: spend has zero days, where multiplicative errors are undefined, and
        # the multiplicative half of the model space doubles the fit time
        return AutoETS(season_length=season, model="AZZ", prediction_intervals=intervals)
    if name == "AutoTheta":
        return AutoTheta(season_length=season, prediction_intervals=intervals)
    if name == "OptimizedTheta":  # one of AutoTheta's four variants: a quarter of its fit time
        return OptimizedTheta(season_length=season, prediction_intervals=intervals)
    return SeasonalNaive(season_length=SEASON, prediction_intervals=intervals)


def backtest(y: np.ndarray, candidates: Sequence[str], seasonal: bool, horizon: int) -> dict[str, float]:
    """Mean absolute error per day of each candidate over rolling origins (the last
    ``BACKTEST_WINDOWS`` blocks of ``min(horizon, BACKTEST_HORIZON_MAX)`` days), each fitted on the
    days before its origin. A candidate that fails to fit is left out."""
    min_train = SEASON + 3 if seasonal else 5
    # short series get shorter blocks rather than no backtest
    h = max(1, min(horizon, BACKTEST_HORIZON_MAX, (len(y) - min_train) // BACKTEST_WINDOWS))
    windows = min(BACKTEST_WINDOWS, (len(y) - min_train) // h)
    scores: dict[str, float] = {}
    if windows < 1:
        return scores
    for name in candidates:
        errors = []
        try:
            for k in range(windows, 0, -1):
                origin = len(y) - k * h
                mean = _model(name, seasonal).forecast(y=y[:origin], h=h)["mean"]
                errors.append(float(np.mean(np.abs(mean - y[origin : origin + h]))))
        except Exception:  # noqa: BLE001 - a model that cannot fit this series is simply not chosen
            continue
        if errors and all(math.isfinite(e) for e in errors):
            scores[name] = float(np.mean(errors))
    return scores


def _run_rate(y: np.ndarray, horizon: int, levels: Sequence[int], rng: np.random.Generator) -> tuple:
    rate = float(np.mean(y)) if len(y) else 0.0
    if len(y):
        days = rng.choice(y, size=(N_PATHS, horizon), replace=True)
        multiplier = np.exp(rng.normal(-(RUN_RATE_SIGMA**2) / 2, RUN_RATE_SIGMA, size=(N_PATHS, 1)))
        paths = days * multiplier
    else:
        paths = np.zeros((N_PATHS, horizon))
    mean = np.full(horizon, rate)
    bands = {}
    for level in levels:
        tail = (100 - level) / 200
        bands[f"lo-{level}"] = np.quantile(paths, tail, axis=0)
        bands[f"hi-{level}"] = np.quantile(paths, 1 - tail, axis=0)
    return mean, bands, paths


def forecast_series(
    history_nanos: Sequence[int],
    horizon: int,
    levels: Sequence[int] = LEVELS,
    *,
    month_remaining_days: int | None = None,
    month_to_date_nanos: int = 0,
    seed: int = 0,
    fit_days: int = DEFAULT_FIT_DAYS,
    quick: bool = False,
) -> SeriesForecast:
    """Forecast the next ``horizon`` days after ``history_nanos`` (complete days, oldest first).

    ``month_remaining_days`` (today through the month's last day) asks for the month-end
    projection: ``month_to_date_nanos`` (the month's complete days, exact) plus the simulated
    remaining days. The first forecast day is the day after the history's last.
    """
    if not 1 <= horizon <= MAX_HORIZON:
        raise ValueError(f"horizon must be 1..{MAX_HORIZON}")
    levels = tuple(sorted(levels))
    values = list(history_nanos)
    first = next((i for i, v in enumerate(values) if v > 0), len(values))
    y = np.asarray(values[first:][-min(fit_days, MAX_FIT_DAYS) :], dtype=float) / NANOS_PER_USD
    n = len(y)
    steps = max(horizon, month_remaining_days or 0)
    rng = np.random.default_rng(seed)

    method, intervals, scores = RUN_RATE, "bootstrap", {}
    mean, bands, paths = None, None, None
    if n >= MIN_MODEL_DAYS:
        seasonal = n >= MIN_SEASONAL_DAYS
        if quick:
            candidates = QUICK_SEASONAL_CANDIDATES if seasonal else QUICK_NONSEASONAL_CANDIDATES
        else:
            candidates = SEASONAL_CANDIDATES if seasonal else NONSEASONAL_CANDIDATES
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            scores = backtest(y, candidates, seasonal, steps)
            # the backtest's order, then the candidates it could not score (a model may still fit all days)
            ranked = sorted(scores, key=lambda c: (scores[c], candidates.index(c)))
            ranked += [c for c in candidates if c not in scores]
            for name in ranked:
                try:
                    mean, bands, paths, intervals = _fit(name, seasonal, y, steps, levels, seed, conformal=not quick)
                    method = name
                    break
                except Exception:  # noqa: BLE001 - next candidate, and run_rate after the last
                    continue
    if method == RUN_RATE:
        mean, bands, paths = _run_rate(y, steps, levels, rng)
        intervals = "bootstrap"

    paths = np.nan_to_num(paths, nan=0.0, posinf=0.0, neginf=0.0)
    points = _nanos(np.nan_to_num(mean))
    days = tuple(
        nest(
            points[d],
            [_nanos(np.nan_to_num(bands[f"lo-{lv}"][d : d + 1]))[0] for lv in levels],
            [_nanos(np.nan_to_num(bands[f"hi-{lv}"][d : d + 1]))[0] for lv in levels],
        )
        for d in range(steps)
    )
    points = [b.point for b in days]
    total = _path_band(points[:horizon], paths[:, :horizon].sum(axis=1), levels)
    month_end = None
    if month_remaining_days is not None:
        rem = month_remaining_days
        month_end = _path_band(points[:rem], paths[:, :rem].sum(axis=1), levels, offset=month_to_date_nanos)
    return SeriesForecast(method, n, intervals, levels, days[:horizon], total, month_end, scores)


def _fit(name: str, seasonal: bool, y: np.ndarray, steps: int, levels: Sequence[int], seed: int, *, conformal=True):
    """The model's forecast, bands and simulated paths. With enough history the bands are the wider
    of the model's own and the conformal ones (measured on synthetic spend, conformal bands from a
    few windows alone covered too little: bench/RESULTS.md, "Forecasts")."""
    model = _model(name, seasonal)
    model.fit(y)
    out = dict(model.predict(h=steps, level=list(levels)))
    if not np.all(np.isfinite(out["mean"])):
        raise ValueError("non-finite forecast")
    paths = model.simulate(h=steps, n_paths=N_PATHS, seed=seed)
    windows = min(CONFORMAL_MAX_WINDOWS, (len(y) - 1) // steps)
    intervals = "model"
    if conformal and windows >= CONFORMAL_MIN_WINDOWS:
        try:
            conformal = _model(name, seasonal, steps, windows)
            conformal.fit(y)
            bands = conformal.predict(h=steps, level=list(levels))
            for level in levels:
                out[f"lo-{level}"] = np.fmin(out[f"lo-{level}"], bands[f"lo-{level}"])
                out[f"hi-{level}"] = np.fmax(out[f"hi-{level}"], bands[f"hi-{level}"])
            intervals = "conformal"
        except Exception:  # noqa: BLE001 - a window too short for the model: its own bands stand
            pass
    return out["mean"], out, np.asarray(paths, dtype=float), intervals


@dataclass(frozen=True)
class SeriesInput:
    #: the group's key (None: the whole scope)
    key: str | None
    #: complete days, oldest first, nano-USD
    history: tuple[int, ...]
    #: the current month's complete days (exact), for the month-end projection
    month_to_date: int = 0


@dataclass(frozen=True)
class ForecastJob:
    series: tuple[SeriesInput, ...]
    horizon: int
    levels: tuple[int, ...] = LEVELS
    month_remaining_days: int | None = None
    fit_days: int = DEFAULT_FIT_DAYS
    seed: int = 0
    #: series after the first ``full_series`` are fitted ``quick`` (None: none)
    full_series: int | None = None
    #: the index of the job's first series in its request (a chunk of a larger job)
    offset: int = 0


class ForecastTimeout(Exception):
    """The job passed its deadline between two series."""


def run_job(job: ForecastJob, deadline: float | None = None) -> list[SeriesForecast]:
    """Every series of the job, in order; checks ``deadline`` (``time.time()``) between series so a
    worker stops within one series' fit of it."""
    import time as _time

    out = []
    for index, s in enumerate(job.series, start=job.offset):
        if deadline is not None and _time.time() > deadline:
            raise ForecastTimeout(f"stopped after {len(out)} of {len(job.series)} series")
        out.append(
            forecast_series(
                s.history,
                job.horizon,
                job.levels,
                month_remaining_days=job.month_remaining_days,
                month_to_date_nanos=s.month_to_date,
                seed=job.seed,
                fit_days=job.fit_days,
                quick=job.full_series is not None and index >= job.full_series,
            )
        )
    return out


def warm_up() -> float:
    """Import statsforecast and fit each candidate once (a worker's start-up); returns seconds."""
    import time as _time

    started = _time.perf_counter()
    history = [(10 + 5 * (d % 7 < 5)) * NANOS_PER_USD for d in range(42)]
    forecast_series(history, 7)
    return _time.perf_counter() - started
