"""The forecast core on synthetic series of known structure, and history re-pricing."""

from __future__ import annotations

import random
import time
from datetime import date, timedelta
from decimal import Decimal

import pytest
from genai_prices import types as gp

from spendstream.insights import usd
from spendstream.insights.forecast import (
    NONSEASONAL_CANDIDATES,
    SEASONAL_CANDIDATES,
    Band,
    ForecastJob,
    ForecastTimeout,
    SeriesInput,
    forecast_series,
    nest,
    run_job,
)
from spendstream.insights.repricing import linear_cost, price_changed_since, reprice_history
from spendstream.pricing import load_catalog

USD = 10**9


def series(days: int, f, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [max(0, int((f(t) + rng.gauss(0, 0.3)) * USD)) for t in range(days)]


def weekly(t: int) -> float:
    return 20.0 if t % 7 < 5 else 4.0


def assert_band(b: Band) -> None:
    assert all(isinstance(v, int) for v in (b.point, *b.lo, *b.hi))
    lo80, lo95 = b.lo
    hi80, hi95 = b.hi
    assert 0 <= lo95 <= lo80 <= b.point <= hi80 <= hi95, b


def assert_all_bands(f) -> None:
    for b in f.days:
        assert_band(b)
    assert_band(f.total)
    if f.month_end is not None:
        assert_band(f.month_end)


def test_weekly_pattern_is_kept_and_bands_nest():
    history = series(84, weekly)
    f = forecast_series(history, 14, month_remaining_days=10, month_to_date_nanos=7 * USD)
    assert f.method in SEASONAL_CANDIDATES and f.history_days == 84
    assert set(f.backtest_mae) == set(SEASONAL_CANDIDATES)
    assert f.method == min(f.backtest_mae, key=lambda m: (f.backtest_mae[m], SEASONAL_CANDIDATES.index(m)))
    assert_all_bands(f)
    # the history ends on t=83 (weekday 83 % 7 = 6): the first forecast day is t=84, a "weekday" (0)
    points = [b.point for b in f.days]
    weekdays = [points[i] for i in range(14) if (84 + i) % 7 < 5]
    weekends = [points[i] for i in range(14) if (84 + i) % 7 >= 5]
    assert min(weekdays) > 3 * max(weekends)
    # the total's interval is from simulated paths: narrower than the sum of the daily bands
    assert f.total.point == sum(points)
    assert f.total.hi[0] - f.total.lo[0] < sum(b.hi[0] - b.lo[0] for b in f.days)
    # month end: the exact month to date plus the first 10 forecast days
    assert f.month_end.point == 7 * USD + sum(points[:10])


def test_trend_is_followed():
    f = forecast_series(series(60, lambda t: 5 + 0.5 * t), 10)
    assert f.method in SEASONAL_CANDIDATES
    assert f.days[-1].point > f.days[0].point > 30 * USD
    assert_all_bands(f)


def test_short_history_is_a_wide_run_rate():
    history = [0, 0, 0, 3 * USD, 5 * USD, 4 * USD]  # leading days without spend do not count
    f = forecast_series(history, 30)
    assert (f.method, f.history_days, f.intervals) == ("run_rate", 3, "bootstrap")
    assert f.days[0].point == 4 * USD
    assert_all_bands(f)
    assert f.total.hi[1] - f.total.lo[1] > f.total.point  # wide: more than the point itself
    assert f.days[0].lo[1] < 3 * USD < 5 * USD < f.days[0].hi[1]


@pytest.mark.parametrize("days", [7, 10, 13])
def test_seven_to_thirteen_days_get_a_non_seasonal_model(days):
    f = forecast_series(series(days, lambda t: 6.0), 7)
    assert f.method in NONSEASONAL_CANDIDATES and f.history_days == days
    assert "SeasonalNaive" not in f.backtest_mae
    assert_all_bands(f)


def test_no_spend_forecasts_zero():
    f = forecast_series([0] * 30, 7, month_remaining_days=3, month_to_date_nanos=0)
    assert f.method == "run_rate" and f.history_days == 0
    assert f.total == Band(0, (0, 0), (0, 0)) and f.month_end == Band(0, (0, 0), (0, 0))


def test_intermittent_zeros_never_go_below_zero():
    rng = random.Random(3)
    history = [rng.choice([0, 0, 0, 9 * USD]) for _ in range(90)]
    f = forecast_series(history, 30, month_remaining_days=31, month_to_date_nanos=USD)
    assert_all_bands(f)
    assert len(f.days) == 30  # the month's 31 days are simulated, 30 reported


def test_conformal_intervals_once_the_series_holds_enough_windows():
    assert forecast_series(series(120, weekly), 30).intervals == "conformal"  # 3 windows of 30 days
    assert forecast_series(series(60, weekly), 30).intervals == "model"


def test_nest_orders_crossing_model_bands():
    band = nest(5, [7, 9], [3, 2])  # a model's bands that cross the point and each other
    assert band == Band(5, (5, 5), (5, 5))
    assert nest(-3, [-9, -12], [4, 6]) == Band(0, (0, 0), (4, 6))


def test_money_strings_are_exact_with_nine_places():
    assert usd(1) == "0.000000001" and usd(12_345_678_901) == "12.345678901" and usd(-5) == "-0.000000005"
    fields = Band(1_500_000_000, (1, 0), (2 * USD, 3 * USD)).fields((80, 95))
    assert fields == {"point_usd": "1.500000000", "lo_80_usd": "0.000000001", "hi_80_usd": "2.000000000",
                      "lo_95_usd": "0.000000000", "hi_95_usd": "3.000000000"}  # fmt: skip
    assert all(Decimal(v) * USD == int(Decimal(v) * USD) for v in fields.values())


def test_run_job_stops_at_its_deadline():
    job = ForecastJob(series=(SeriesInput(None, tuple(series(30, weekly))),) * 3, horizon=7)
    assert len(run_job(job)) == 3
    with pytest.raises(ForecastTimeout):
        run_job(job, deadline=time.time() - 1)


def test_bad_horizon_is_refused():
    with pytest.raises(ValueError):
        forecast_series([USD] * 10, 0)


# -- history re-priced at today's price ---------------------------------------------------------
CHANGE = date(2026, 3, 1)


def _catalog():
    old = gp.ModelPrice(input_mtok=Decimal("2"), output_mtok=Decimal("8"))
    new = gp.ModelPrice(input_mtok=Decimal("1"), output_mtok=Decimal("4"))
    model = gp.ModelInfo(
        id="house-1",
        match=gp.ClauseEquals(equals="house-1"),
        prices=[gp.ConditionalPrice(prices=old), gp.ConditionalPrice(gp.StartDateConstraint(CHANGE), prices=new)],
    )
    steady = gp.ModelInfo(
        id="steady-1", match=gp.ClauseEquals(equals="steady-1"), prices=gp.ModelPrice(input_mtok=Decimal("3"))
    )
    return load_catalog([gp.Provider(id="acme", name="Acme", api_pattern="x", models=[model, steady])])


def test_a_price_change_inside_the_history_is_repriced_to_today():
    catalog = _catalog()
    tokens = {"input_tokens": 1_000_000, "output_tokens": 100_000, "calls": 10}
    before = {"day": CHANGE - timedelta(days=1), "provider": "acme", "model": "house-1", **tokens,
              "cost_nanos": 2 * USD + 800_000_000}  # fmt: skip
    after = {**before, "day": CHANGE, "cost_nanos": USD + 400_000_000}
    steady = {**before, "model": "steady-1", "cost_nanos": 3 * USD}
    unknown = {**before, "model": "mystery", "cost_nanos": 0}
    rows, changes = reprice_history([before, after, steady, unknown], catalog, CHANGE + timedelta(days=5))
    assert [r["cost_nanos"] for r in rows] == [USD + 400_000_000, USD + 400_000_000, 3 * USD, 0]
    (change,) = changes
    assert (change.provider, change.model, change.days, change.delta_nanos) == ("acme", "house-1", 1, -1_400_000_000)
    assert price_changed_since(catalog, "acme", "house-1", CHANGE - timedelta(days=30), CHANGE)
    assert not price_changed_since(catalog, "acme", "house-1", CHANGE, CHANGE + timedelta(days=30))  # before the window
    assert not price_changed_since(catalog, "acme", "steady-1", date(2000, 1, 1), CHANGE)
    # overrides keep the history as charged
    rows, changes = reprice_history([before], catalog, CHANGE, overridden=frozenset({("acme", "house-1")}))
    assert rows[0]["cost_nanos"] == before["cost_nanos"] and changes == []


def test_linear_cost_rounds_once_half_to_even():
    catalog = load_catalog(
        [gp.Provider(id="acme", name="Acme", api_pattern="x", models=[gp.ModelInfo(
            id="odd", match=gp.ClauseEquals(equals="odd"), prices=gp.ModelPrice(input_mtok=Decimal("0.0005")))])]
    )  # fmt: skip
    row = catalog.resolve("acme", "odd").model.schedule.fixed
    assert linear_cost(row, {"input_tokens": 1}, 0) == 0  # 0.5 nano -> 0 (even)
    assert linear_cost(row, {"input_tokens": 3}, 0) == 2  # 1.5 nano -> 2 (even)


def test_quick_fits_use_the_cheap_candidates_past_full_series():
    history = tuple(series(84, weekly))
    job = ForecastJob(series=(SeriesInput("a", history), SeriesInput("b", history)), horizon=7, full_series=1)
    full, quick = run_job(job)
    assert full.method in SEASONAL_CANDIDATES and set(full.backtest_mae) == set(SEASONAL_CANDIDATES)
    assert quick.method in ("OptimizedTheta", "SeasonalNaive") and quick.intervals == "model"
    assert set(quick.backtest_mae) == {"OptimizedTheta", "SeasonalNaive"}
    assert_all_bands(quick)
    # a chunk of a larger job counts its series from its offset
    (chunk,) = run_job(ForecastJob(series=(SeriesInput("c", history),), horizon=7, full_series=1, offset=5))
    assert chunk.method in ("OptimizedTheta", "SeasonalNaive")


def test_trend_changes_are_exact_and_ranked():
    from spendstream.insights.trends import change, movers

    assert change((3 * USD, 3), (USD, 2)) == {
        "cost_usd": "2.000000000", "cost_percent": 200.0, "calls": 1, "calls_percent": 50.0,
        "cost_per_call_usd": "0.500000000", "cost_per_call_percent": 100.0,
    }  # fmt: skip
    assert change((USD, 1), (0, 0))["cost_percent"] is None
    ranked = movers({"a": (5, 1), "b": (100, 2)}, {"a": (50, 1), "c": (30, 3)}, limit=2)
    assert [m["key"] for m in ranked] == ["b", "a"]  # |+100| then |-45|; c (-30) is cut by the limit
