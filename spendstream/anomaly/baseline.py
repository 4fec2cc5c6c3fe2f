"""The usual spend of a scope for one hour: robust statistics of its past minutes. Pure.

A scope is (project, agent) or (project, "") for the whole project. Its samples are the minutes
of the same hour of the week over the last weeks once the scope has at least
``WEEKLY_HISTORY_DAYS`` of history, else of the same hour of the day over the last days; a minute
without spend in that time is a sample of 0 (quiet nights stay quiet). The statistics are the
median, the MAD (median absolute deviation) and the interquartile range of the minute spends,
robust to the odd spike, and the mean of each quarter of the hour (``Baseline.usual_at``: an
hour whose spend is in part of it, e.g. a working day that starts at :30).

The level spread of one minute (``Baseline.level_spread``, the detector's level score) is
1.4826 x MAD, at least the interquartile range / 1.349 (an hour of two halves, one quiet, has a
MAD of 0) and a tenth of the usual minute; the call-count noise is judged apart, on the exact
Poisson tail (:func:`poisson_score`, with ``Baseline.call_unit``), and the cost of single calls
against ``Baseline.call_cv`` (:func:`call_cv_of`). :func:`minute_spread` adds the Gaussian
spread of a Poisson count of the usual calls, sqrt(usual x cost per call), for the first
estimate's trimming below (a scope with a call every few minutes has a median and a MAD of 0).

Anomalous minutes do not widen the baseline: a sample that would itself be scored anomalous
against the first estimate (``Rule``'s score and ratio, with the spread above) is replaced by the
median before the final statistics, so a past runaway does not hide the next one.

The means (cost, calls, tokens, cost per model per minute) of the trimmed samples explain an
alert: cost = calls x tokens per call x cost per token, so the ratios of the three factors to
their usual values multiply to the cost ratio exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
#: history a scope needs before its baseline is the same hour of the WEEK (else of the day): three
#: weeks, so that it has three past hours of the week (180 samples, ``min_history_minutes``)
WEEKLY_HISTORY_DAYS = 21
#: a young scope's same-hour-of-the-day samples are days of the scored day's type (weekday or
#: weekend) when at least this many of them are in its short history (else all its days)
SAME_TYPE_MIN_DAYS = 3
#: MAD -> standard deviation of a normal distribution
MAD_SCALE = 1.4826
#: interquartile range -> standard deviation of a normal distribution
IQR_SCALE = 1.349
#: the least spread of one call's cost (a tenth of it, as ``spread``'s tenth of the usual minute)
MIN_CALL_CV = 0.1
#: minutes with calls a scope needs for its own call spread (else ``Baseline.call_cv``'s 1.0)
MIN_CALL_SAMPLES = 20


@dataclass(frozen=True, slots=True)
class Baseline:
    """Per-minute usual figures of a scope for one hour (nano-USD; calls and tokens as means)."""

    median: int
    mad: int
    mean_cost: float
    mean_calls: float
    mean_tokens: float
    #: "provider/model" -> mean cost per minute
    model_cost: dict[str, float]
    samples: int
    seasonality: str  # "hour_of_week" | "hour_of_day"
    #: interquartile range of the minute spends (a spread that sees an hour of two halves)
    iqr: int = 0
    #: mean spend a minute in each quarter of the hour (an hour whose spend is in part of it)
    quarters: tuple[float, ...] = ()
    #: a project's: the sum of its agents' usual minutes (:func:`with_members`)
    members_usual: float = 0.0
    #: the spread of one call's cost over the usual cost per call (:func:`call_cv_of`)
    call_cv: float = 1.0

    @property
    def per_call(self) -> float:
        """The usual cost of one call (nano-USD; 0 without calls)."""
        return self.mean_cost / self.mean_calls if self.mean_calls else 0.0

    @property
    def call_unit(self) -> float:
        """The cost of one call of the compound-Poisson count that has the spend's variance:
        per call x (1 + cv^2) (E[c^2] / E[c]), so that spend / unit is a Poisson count of mean
        usual / unit (:func:`poisson_score`)."""
        return self.per_call * (1.0 + max(self.call_cv, MIN_CALL_CV) ** 2)

    @property
    def usual(self) -> float:
        """The usual spend of one minute: the median, or the mean for a scope that spends in
        few minutes (median 0)."""
        return max(float(self.median), self.mean_cost, self.members_usual)

    def usual_at(self, minute_ms: int) -> float:
        """The usual spend of the minute starting at ``minute_ms``: :attr:`usual`, or the mean of
        its quarter of the hour when that is higher (an office agent whose day starts at :30 is
        busy in half of the hour: twice the hour's mean then, which is no anomaly)."""
        if not self.quarters:
            return self.usual
        return max(self.usual, self.quarters[minute_ms % HOUR_MS // (15 * MINUTE_MS)])

    def level_spread(self, usual: float) -> float:
        """The spread of a minute's spend from the scope's level, for a minute whose usual spend is
        ``usual`` (:meth:`usual_at`): the day-to-day and within-hour movement the samples show
        (1.4826 x MAD, the interquartile range / 1.349, a tenth of the usual), without the
        call-count noise, which :func:`poisson_score` judges exactly."""
        return max(spread(self.mad, usual), self.iqr / IQR_SCALE)


@dataclass(slots=True)
class MinuteSample:
    cost: int = 0
    calls: int = 0
    tokens: int = 0
    models: dict[str, int] = field(default_factory=dict)


def median_of(values: list[int]) -> int:
    """The lower median (an int: money stays integer)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def iqr_of(values: list[int]) -> int:
    """The interquartile range (lower quartiles, as :func:`median_of`)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[(3 * (len(ordered) - 1)) // 4] - ordered[(len(ordered) - 1) // 4]


def sample_days(hour_start_ms: int, first_seen_ms: int, lookback_days: int, short_days: int) -> tuple[list[int], str]:
    """The starts of the past hours that are samples of the hour starting at ``hour_start_ms``,
    and the seasonality used; only hours at or after the scope's first minute count."""
    history_days = (hour_start_ms - first_seen_ms) // DAY_MS
    if history_days >= WEEKLY_HISTORY_DAYS and lookback_days // 7 >= 3:
        starts = [hour_start_ms - k * WEEK_MS for k in range(1, lookback_days // 7 + 1)]
        seasonality = "hour_of_week"
    else:
        starts = [hour_start_ms - k * DAY_MS for k in range(1, short_days + 1)]
        seasonality = "hour_of_day"
    # an hour that ended before the scope's first minute is no sample; the hour it started in is
    starts = [s for s in starts if s + HOUR_MS > first_seen_ms]
    if seasonality == "hour_of_day":
        # days of the same type only (Monday-Friday or Saturday-Sunday, UTC) when there are
        # ``SAME_TYPE_MIN_DAYS`` of them: a young scope's few days may be mostly a weekend
        same = same_day_type(starts, hour_start_ms)
        if len(same) >= SAME_TYPE_MIN_DAYS:
            starts = same
    return starts, seasonality


def same_day_type(starts: Iterable[int], hour_start_ms: int) -> list[int]:
    """The ``starts`` on the same type of day as ``hour_start_ms``: Monday-Friday or Saturday-Sunday (UTC)."""
    weekend = is_weekend(hour_start_ms)
    return [s for s in starts if is_weekend(s) == weekend]


def is_weekend(ms: int) -> bool:
    """Saturday or Sunday (UTC); the epoch was a Thursday."""
    return (ms // DAY_MS + 3) % 7 >= 5


def build_baseline(
    minutes: dict[int, MinuteSample],
    hour_starts: Iterable[int],
    seasonality: str,
    *,
    score: float,
    ratio: float,
    min_samples: int,
) -> Baseline | None:
    """The baseline from a scope's minutes (minute start ms -> figures) within ``hour_starts``'s
    hours; None with fewer than ``min_samples`` minutes of history."""
    keys = [h + i * MINUTE_MS for h in hour_starts for i in range(60)]
    if len(keys) < min_samples:
        return None
    empty = MinuteSample()
    samples = [minutes.get(k, empty) for k in keys]
    costs = [s.cost for s in samples]
    median = median_of(costs)
    mad = median_of([abs(c - median) for c in costs])
    mean = sum(costs) / len(costs)
    usual = max(float(median), mean)
    # the first estimate's spread as the detector's (minute_spread): a scope with a median minute
    # of 0 (a call every few minutes) has a MAD of 0, and each of its calls would be trimmed
    calls = sum(s.calls for s in samples)
    per_call = sum(costs) / calls if calls else 0.0
    scale = minute_spread(mad, iqr_of(costs), usual, per_call)
    # drop what this first estimate calls anomalous, then estimate again
    anomalous = [s.cost >= ratio * usual and (s.cost - usual) / scale >= score for s in samples]
    kept = [s for s, out in zip(samples, anomalous, strict=True) if not out]
    trimmed = len(samples) - len(kept)
    if trimmed:
        costs = [s.cost for s in kept] + [median] * trimmed
        median = median_of(costs)
        mad = median_of([abs(c - median) for c in costs])
    n = len(samples)
    # the mean of each quarter of the hour (trimmed samples: an anomalous minute counts as the median)
    quarter_sums = [0, 0, 0, 0]
    for j, (sample, out) in enumerate(zip(samples, anomalous, strict=True)):
        quarter_sums[j % 60 // 15] += median if out else sample.cost
    quarters = tuple(total / (n / 4) for total in quarter_sums)
    model_sums: dict[str, int] = {}
    for s in kept:
        for model, cost in s.models.items():
            model_sums[model] = model_sums.get(model, 0) + cost
    model_cost = {model: total / n for model, total in model_sums.items()}
    kept_calls = sum(s.calls for s in kept)
    return Baseline(
        median=median,
        mad=mad,
        mean_cost=sum(costs) / n,
        mean_calls=kept_calls / n,
        mean_tokens=sum(s.tokens for s in kept) / n,
        model_cost=model_cost,
        samples=n,
        seasonality=seasonality,
        iqr=iqr_of(costs),
        quarters=quarters,
        call_cv=call_cv_of(kept, sum(s.cost for s in kept) / kept_calls if kept_calls else 0.0),
    )


def seasonal_baseline(
    minutes: dict[int, MinuteSample],
    hour_start_ms: int,
    first_seen_ms: int,
    *,
    lookback_days: int,
    short_days: int,
    score: float,
    ratio: float,
    min_samples: int,
) -> Baseline | None:
    """A scope's baseline for the hour starting at ``hour_start_ms``: its samples
    (:func:`sample_days`) through :func:`build_baseline`. A young scope with fewer than
    ``SAME_TYPE_MIN_DAYS`` days of the scored day's type takes every day, and when its days of
    that type alone (one or two) show a higher usual minute, their baseline: an office agent that
    started on a Saturday spends at weekdays' rate from its first Monday on, which its weekend
    days would otherwise make read as 3-4x its usual until its third weekday. A lower usual from
    them is not taken (a weekend hour against weekdays reads low: a missed spike, not a false
    alert)."""
    hours, seasonality = sample_days(hour_start_ms, first_seen_ms, lookback_days, short_days)
    baseline = build_baseline(minutes, hours, seasonality, score=score, ratio=ratio, min_samples=min_samples)
    if baseline is None or seasonality != "hour_of_day":
        return baseline
    same = same_day_type(hours, hour_start_ms)
    if not same or len(same) == len(hours):
        return baseline
    alone = build_baseline(minutes, same, seasonality, score=score, ratio=ratio, min_samples=1)
    return alone if alone is not None and alone.usual > baseline.usual else baseline


def call_cv_of(samples: Iterable[MinuteSample], per_call: float) -> float:
    """The robust spread of one call's cost over the usual cost per call, from minute sums: a
    minute of n calls has a mean cost per call that spreads 1/sqrt(n) times one call's, so
    d = (cost / n - per call) x sqrt(n) spreads like one call. The spread is the larger of
    1.4826 x their MAD and the distance from their median to their 84th percentile (one standard
    deviation of a normal): call costs are skewed to the right (a few big calls), which the MAD
    understates and the per-call path (``detector.per_call_score``) tests. Over per call; 1.0
    (wide) with fewer than ``MIN_CALL_SAMPLES`` minutes with calls."""
    if per_call <= 0:
        return 1.0
    deviations = sorted((s.cost / s.calls - per_call) * math.sqrt(s.calls) for s in samples if s.calls)
    n = len(deviations)
    if n < MIN_CALL_SAMPLES:
        return 1.0
    middle = deviations[(n - 1) // 2]
    mad = sorted(abs(d - middle) for d in deviations)[(n - 1) // 2]
    upper = deviations[min(n - 1, round(0.8413 * (n - 1)))] - middle
    return max(MAD_SCALE * mad, upper) / per_call


def poisson_score(count: float, mean: float) -> float:
    """The normal score of a Poisson count at least ``count`` when ``mean`` is usual: the signed
    root of the deviance, sqrt(2 (x ln(x / mean) - x + mean)), within about 0.1 of the exact
    tail's normal quantile down to a mean of 0.5 (where the Gaussian (x - mean) / sqrt(mean) is
    1.5-2 too high: 8 calls in a window that usually has 1.8 is 4.6 on it but 3.3 exactly).
    0 at or below the mean; infinite for a mean of 0."""
    if count <= mean:
        return 0.0
    if mean <= 0:
        return math.inf
    return math.sqrt(2.0 * (count * math.log(count / mean) - count + mean))


def with_members(project: Baseline, members: Iterable[Baseline]) -> Baseline:
    """A project's baseline whose usual minute is at least the sum of its agents' usual minutes.
    A project's samples (same hour of the week over weeks) may predate an agent that joined it
    since and now makes most of its spend; that agent's own baseline (same hour of the day while
    its history is short) has it, and the project's spend is not 3x its usual for that."""
    total = sum(b.usual for b in members)
    return replace(project, members_usual=total) if total > project.usual else project


def minute_spread(mad: int, iqr: int, usual: float, per_call: float) -> float:
    """The spread of one minute's spend (module doc): :func:`spread`, at least the interquartile
    range / 1.349 and the spread of a Poisson count of ``usual / per_call`` calls."""
    return max(spread(mad, usual), iqr / IQR_SCALE, math.sqrt(usual * per_call))


def spread(mad: int, usual: float) -> float:
    """The robust spread of a minute's spend: 1.4826 x MAD, but at least a tenth of the usual
    spend and 1 nano-USD (a perfectly steady scope has MAD 0: any wobble would score infinite)."""
    return max(MAD_SCALE * mad, 0.1 * usual, 1.0)
