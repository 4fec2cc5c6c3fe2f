"""Insights: spend forecasts (``/v1/forecast``), savings recommendations (``/v1/recommendations``)
and model cost comparison (``/v1/analytics/cost-comparison``). docs/insights.md describes them.

History comes from the usage aggregates through the analytics query planner
(``query_api.usage_sql``); the models and the arithmetic are ``spendstream.insights``; fits run
in worker processes (``query_api.insights``).
"""

from __future__ import annotations

import asyncio
import calendar
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from query_api.deps import CH, Reader, SettingsDep
from query_api.errors import InvalidField
from query_api.filters import Filters, parse_filters
from query_api.insights import ForecastRunner
from query_api.routers.analytics import json_response, run_usage
from query_api.routers.pricing import CatalogDep, tenant_override_rows
from query_api.usage_sql import TOKEN_COLUMNS, GroupBy, UsageQuery
from spendstream.insights import usd
from spendstream.insights.forecast import MAX_HORIZON, ForecastJob, SeriesForecast, SeriesInput
from spendstream.insights.repricing import reprice_history

router = APIRouter(tags=["insights"])

FORECAST_BY = ("project", "agent", "model", "provider", "user")
MAX_LEVELS = 4
HISTORY_MEASURES = ("calls", "cost_nanos", *TOKEN_COLUMNS)


def get_runner(request: Request) -> ForecastRunner:
    """The app's forecast runner (the lifespan starts it; made here if a test app has none)."""
    runner = getattr(request.app.state, "forecasts", None)
    if runner is None:
        runner = request.app.state.forecasts = ForecastRunner(request.app.state.settings.insights)
    return runner


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise InvalidField("level", f"expected comma-separated integers such as 80,95, got {text[:40]!r}") from None
    if not levels or len(levels) > MAX_LEVELS or not all(50 <= lv <= 99 for lv in levels):
        raise InvalidField("level", f"1 to {MAX_LEVELS} levels, each 50..99")
    return levels


def scope_filters(
    *, tz: str | None, dims: dict[str, list[str] | None], tags: list[str] | None, first: date, last: date
) -> Filters:
    """The analytics filters over the local days [first, last] (``last`` included)."""
    return parse_filters(
        start=first.isoformat(), end=last.isoformat(), tz=tz, dims=dims, tags=tags, now=datetime.now(UTC)
    )


def _with_dimension(filters: Filters, name: str, values: list[str]) -> Filters:
    dims = dict(filters.dims)
    dims[name] = tuple(values)
    return Filters(filters.start, filters.end, filters.tz, tuple(sorted(dims.items())), filters.tags)


def _band_view(f: SeriesForecast, first_day: date) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": f.method,
        "history_days": f.history_days,
        "intervals": f.intervals,
        "series": [
            {"date": (first_day + timedelta(days=i)).isoformat(), **band.fields(f.levels)}
            for i, band in enumerate(f.days)
        ],
        "total": f.total.fields(f.levels),
    }
    if f.backtest_mae:
        out["backtest"] = {"mae_usd_per_day": {k: round(v, 6) for k, v in f.backtest_mae.items()}}
    return out


@router.get("/v1/forecast", summary="Daily spend forecast with nested bands, the horizon's total and month end")
async def forecast(
    request: Request,
    principal: Reader,
    ch: CH,
    settings: SettingsDep,
    catalog: CatalogDep,
    horizon: Annotated[int, Query(ge=1, le=MAX_HORIZON, description="days to forecast, from today")] = 30,
    level: Annotated[str, Query(description="interval levels in percent, comma-separated")] = "80,95",
    granularity: Annotated[Literal["day"], Query(description="only day")] = "day",
    by: Annotated[Literal["project", "agent", "model", "provider", "user"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, description="with by=: the top groups by cost over the history")] = 10,
    tz: Annotated[str | None, Query(description="IANA zone of days and of the month; default UTC")] = None,
    project: Annotated[list[str] | None, Query()] = None,
    agent: Annotated[list[str] | None, Query()] = None,
    user: Annotated[list[str] | None, Query()] = None,
    provider: Annotated[list[str] | None, Query()] = None,
    model: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query(description="key:value, repeatable: all must match")] = None,
) -> Response:
    insights = settings.insights
    levels = parse_levels(level)
    if limit > insights.forecast_max_groups:
        raise InvalidField("limit", f"at most {insights.forecast_max_groups} groups")
    dims = {"project": project, "agent": agent, "user": user, "provider": provider, "model": model}
    probe = scope_filters(tz=tz, dims=dims, tags=tag, first=date(2000, 1, 1), last=date(2000, 1, 2))
    today = datetime.now(probe.tz).date()
    yesterday = today - timedelta(days=1)
    first = today - timedelta(days=insights.forecast_fit_days)
    month_start = today.replace(day=1)
    start = min(first, month_start)
    filters = scope_filters(tz=tz, dims=dims, tags=tag, first=start, last=yesterday) if start < today else None
    month_remaining = calendar.monthrange(today.year, today.month)[1] - today.day + 1

    rows: list[dict[str, Any]] = []
    keys: list[str | None] = [None]
    if filters is not None:
        if by:
            top, _ = await run_usage(
                ch, UsageQuery(filters, group=GroupBy(dimension=by), measures=("cost_nanos", "calls")),
                principal.tenant, order_by="cost_nanos DESC, group_key ASC", limit=limit,
            )  # fmt: skip
            keys = [r["group_key"] for r in top]
            if keys:
                filters = _with_dimension(filters, by, keys)
        if keys:
            rows, _ = await run_usage(
                ch,
                UsageQuery(
                    filters, group=GroupBy(dimension=by) if by else None, granularity="day",
                    split_by=("provider", "model"), measures=HISTORY_MEASURES,
                ),
                principal.tenant,
            )  # fmt: skip
    overridden = frozenset(
        (r["provider"].lower(), r["model"].lower()) for r in await tenant_override_rows(ch, principal.tenant)
    )
    for r in rows:
        r["day"] = datetime.fromtimestamp(int(r["bucket_start"]), probe.tz).date()
    repriced_rows, repriced = await asyncio.to_thread(reprice_history, rows, catalog, today, overridden=overridden)

    days = (today - start).days
    daily: dict[str | None, list[int]] = {k: [0] * days for k in keys}
    for r in repriced_rows:
        index = (r["day"] - start).days
        key = r.get("group_key") if by else None
        if key in daily and 0 <= index < days:
            daily[key][index] += int(r["cost_nanos"])
    month_offset = (month_start - start).days
    job = ForecastJob(
        series=tuple(SeriesInput(k, tuple(v[(first - start).days :]), sum(v[month_offset:])) for k, v in daily.items()),
        horizon=horizon,
        levels=levels,
        month_remaining_days=month_remaining,
        fit_days=insights.forecast_fit_days,
    )
    results, cached = await get_runner(request).forecast(principal.tenant, job) if job.series else ([], False)

    def month_end(f: SeriesForecast, s: SeriesInput) -> dict[str, Any]:
        assert f.month_end is not None
        return {
            "month": f"{today:%Y-%m}",
            "month_to_date_usd": usd(s.month_to_date),
            "remaining_days": month_remaining,
            **f.month_end.fields(levels),
        }

    body: dict[str, Any] = {
        "currency": "USD",
        "granularity": granularity,
        "horizon": horizon,
        "levels": list(levels),
        "tz": probe.tz.key,
        "today": today.isoformat(),
        "history": {"from": first.isoformat(), "to": yesterday.isoformat(), "complete_days_only": True},
        "prices": {
            "basis": "today's catalog prices: history before a catalog price change is re-priced to today's price",
            "repriced": [
                {
                    "provider": c.provider,
                    "model": c.model,
                    "from_price_ids": list(c.from_price_ids),
                    "to_price_id": c.to_price_id,
                    "days": c.days,
                    "delta_usd": usd(c.delta_nanos),
                }
                for c in repriced
            ],  # fmt: skip
        },
        "cached": cached,
    }
    if by:
        body["by"] = by
        body["groups"] = [
            {"key": s.key, **_band_view(f, today), "month_end": month_end(f, s)} for s, f in zip(job.series, results)
        ]
    else:
        f, s = results[0], job.series[0]
        body |= {**_band_view(f, today), "month_end": month_end(f, s)}
    return json_response(body)
