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
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from query_api.deps import CH, Reader, SettingsDep
from query_api.errors import InvalidField
from query_api.filters import Filters, Params, parse_filters
from query_api.insights import ForecastRunner
from query_api.insights_sql import (
    OK,
    TOKEN_SUMS,
    hourly_calls_sql,
    near_tier_condition,
    price_sql,
    repriced_sql,
    scope_conditions,
    usage_summary_sql,
)
from query_api.routers.analytics import json_response, run_usage
from query_api.routers.pricing import CatalogDep, tenant_override_rows
from query_api.usage_sql import TOKEN_COLUMNS, GroupBy, UsageQuery
from spendstream.insights import usd
from spendstream.insights.catalog_info import catalog_model, context_window, same_provider_models, substitute
from spendstream.insights.forecast import MAX_HORIZON, ForecastJob, SeriesForecast, SeriesInput
from spendstream.insights.recommendations import TIER_MARGIN, TYPES, WINDOW_DAYS, Usage, recommend, summary
from spendstream.insights.repricing import price_changed_since, reprice_history
from spendstream.insights.trends import PERIODS, change, figures, movers
from spendstream.pricing.catalog import Catalog, CatalogModel

router = APIRouter(tags=["insights"])

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
    # forecast_fit_days >= 14: the history holds at least one day
    filters = scope_filters(tz=tz, dims=dims, tags=tag, first=start, last=yesterday)
    month_remaining = calendar.monthrange(today.year, today.month)[1] - today.day + 1

    days = (today - start).days
    keys: list[str | None] = [None]
    repriced: list = []
    group = GroupBy(dimension=by) if by else None
    if by:
        top, _ = await run_usage(
            ch, UsageQuery(filters, group=group, measures=("cost_nanos", "calls")),
            principal.tenant, order_by="cost_nanos DESC, group_key ASC", limit=limit,
        )  # fmt: skip
        keys = [r["group_key"] for r in top]
        if keys:
            filters = _with_dimension(filters, by, keys)
    daily = {k: [0] * days for k in keys}

    def add(rows: list[dict[str, Any]], field: str, sign: int = 1) -> None:
        for r in rows:
            index = (datetime.fromtimestamp(int(r["bucket_start"]), probe.tz).date() - start).days
            key = r.get("group_key") if by else None
            if key in daily and 0 <= index < days:
                daily[key][index] += sign * int(r[field])

    if keys:
        # the cost per day (and group), then corrections for the models whose price changed
        costs, _ = await run_usage(
            ch, UsageQuery(filters, group=group, granularity="day", measures=("cost_nanos",)), principal.tenant
        )
        add(costs, "cost_nanos")
        repriced = await _reprice(ch, catalog, filters, group, principal.tenant, start, today, add)
    month_offset = (month_start - start).days
    job = ForecastJob(
        series=tuple(SeriesInput(k, tuple(v[(first - start).days :]), sum(v[month_offset:])) for k, v in daily.items()),
        horizon=horizon,
        levels=levels,
        month_remaining_days=month_remaining,
        fit_days=insights.forecast_fit_days,
        full_series=insights.forecast_full_groups if by else None,
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
            ],
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


async def _reprice(ch, catalog: Catalog, filters: Filters, group, tenant: str, start: date, today: date, add) -> list:
    """Add to the daily costs what today's catalog price changes in them: only models whose catalog
    price changed since ``start`` are read per day and model, with their tokens."""
    pairs, _ = await run_usage(
        ch, UsageQuery(filters, group=GroupBy(dimension="model"), split_by=("provider",), measures=("calls",)), tenant
    )
    overridden = frozenset((r["provider"].lower(), r["model"].lower()) for r in await tenant_override_rows(ch, tenant))
    changed = [
        (r["provider"], r["group_key"]) for r in pairs
        if (r["provider"].lower(), r["group_key"].lower()) not in overridden
        and price_changed_since(catalog, r["provider"], r["group_key"], start, today)
    ]  # fmt: skip
    if not changed:
        return []
    narrowed = _with_dimension(_with_dimension(filters, "provider", sorted({p for p, _ in changed})), "model",
                               sorted({m for _, m in changed}))  # fmt: skip
    rows, _ = await run_usage(
        ch,
        UsageQuery(narrowed, group=group, granularity="day", split_by=("provider", "model"), measures=HISTORY_MEASURES),
        tenant,
    )
    for r in rows:
        r["day"] = datetime.fromtimestamp(int(r["bucket_start"]), filters.tz).date()
    new_rows, repriced = await asyncio.to_thread(reprice_history, rows, catalog, today, overridden=overridden)
    add(rows, "cost_nanos", -1)
    add(new_rows, "cost_nanos")
    return repriced


# -- recommendations and cost comparison: the last 30 days of events, re-priced exactly -------------
#: the scans of 30 days of raw events stop here (a ClickHouse error answer, not a stalled server)
SCAN_LIMITS = {"max_execution_time": 60}
MAX_SOURCE_MODELS = 50
MAX_COMPARED_MODELS = 60
MAX_USAGE_GROUPS = 1000


def window_filters(tz: str | None, dims: dict[str, list[str] | None], tags: list[str] | None) -> Filters:
    """The scope over the last WINDOW_DAYS days, ending now."""
    now = datetime.now(UTC)
    start = (now - timedelta(days=WINDOW_DAYS)).isoformat()
    return parse_filters(start=start, end=now.isoformat(), tz=tz, dims=dims, tags=tags, now=now)


def scope_dims(project, agent, user, provider, model) -> dict[str, list[str] | None]:
    return {"project": project, "agent": agent, "user": user, "provider": provider, "model": model}


async def _check_size(ch: CH, filters: Filters, tenant: str, max_events: int) -> int:
    params = Params()
    sql = f"SELECT count() AS n FROM usage_events WHERE {' AND '.join(scope_conditions(filters, tenant, params))}"
    n = int((await ch.query(sql, parameters=params.values, settings=SCAN_LIMITS)).first_row[0])
    if n > max_events:
        raise InvalidField(
            "agent", f"{n} events in the last {WINDOW_DAYS} days; at most {max_events}: narrow with agent= or project="
        )
    return n


async def recommendation_items(ch: CH, catalog: Catalog, filters: Filters, tenant: str, max_events: int) -> list:
    await _check_size(ch, filters, tenant, max_events)
    params = Params()
    result = await ch.query(
        usage_summary_sql(filters, tenant, params, MAX_USAGE_GROUPS), parameters=params.values, settings=SCAN_LIMITS
    )
    rows = list(result.named_results())
    params = Params()
    hours = {
        (r["agent"], r["project"], r["provider"], r["model"]): tuple(r["hourly_calls"])
        for r in (
            await ch.query(hourly_calls_sql(filters, tenant, params), parameters=params.values, settings=SCAN_LIMITS)
        ).named_results()
    }
    # exact re-pricings, one scan: per source model its substitute's cost and its near-tier costs
    costs: dict[str, str] = {}
    aliases: dict[tuple[str, str], str] = {}
    params = Params()
    for provider_name, model_name in dict.fromkeys((r["provider"], r["model"]) for r in rows):
        model = catalog_model(catalog, provider_name, model_name)
        if model is None or len(aliases) >= MAX_SOURCE_MODELS:
            continue
        alias = f"m{len(aliases)}"
        same = (
            f"provider = {params.add(provider_name, 'String', 'provider')} "
            f"AND model = {params.add(model_name, 'String', 'model')} AND {OK}"
        )
        alt = substitute(catalog, model)
        if alt is not None:
            costs[f"{alias}_downgrade"] = f"if({same}, {price_sql(alt.schedule)}, toInt128(0))"
        near = near_tier_condition(model.schedule, TIER_MARGIN.numerator, TIER_MARGIN.denominator)
        if near is not None:
            costs[f"{alias}_near_calls"] = f"toInt128(if({same} AND {near}, 1, 0))"
            costs[f"{alias}_near_charged"] = f"if({same} AND {near}, toInt128(cost_nanos), toInt128(0))"
            costs[f"{alias}_near_lower"] = (
                f"if({same} AND {near}, {price_sql(model.schedule, one_tier_lower=True)}, toInt128(0))"
            )
        if alt is not None or near is not None:
            aliases[(provider_name, model_name)] = alias
    repriced: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if costs:
        sql = repriced_sql(filters, tenant, params, ["agent", "project", "provider", "model"], costs)
        for r in (await ch.query(sql, parameters=params.values, settings=SCAN_LIMITS)).named_results():
            repriced[(r["agent"], r["project"], r["provider"], r["model"])] = r
    usages = []
    for r in rows:
        key = (r["agent"], r["project"], r["provider"], r["model"])
        alias = aliases.get((r["provider"], r["model"]))
        extra = repriced.get(key, {})
        downgrade_cost = extra.get(f"{alias}_downgrade") if alias else None
        near = None
        if alias and f"{alias}_near_calls" in extra:
            near = tuple(int(extra[f"{alias}_near_{k}"]) for k in ("calls", "charged", "lower"))
        usages.append(
            Usage(
                agent=r["agent"], project=r["project"], provider=r["provider"], model=r["model"],
                calls=int(r["calls"]), error_calls=int(r["error_calls"]), cost_nanos=int(r["cost_total"]),
                error_cost_nanos=int(r["error_cost_nanos"]),
                ok_tokens={c: int(r[f"ok_{c}"]) for c in TOKEN_SUMS},
                mean_output_tokens=float(r["mean_output_tokens"] or 0.0),
                p99_input_tokens=int(r["p99_input_tokens"] or 0), active_days=int(r["active_days"]),
                batch_tagged_calls=int(r["batch_tagged_calls"]), hourly_calls=hours.get(key, ()),
                downgrade_cost_nanos=None if downgrade_cost is None else int(downgrade_cost), near_tier=near,
            )
        )  # fmt: skip
    return await asyncio.to_thread(recommend, usages, catalog, datetime.now(UTC).date())


def _window(filters: Filters) -> dict[str, Any]:
    return {"from": filters.start.isoformat(), "to": filters.end.isoformat(), "window_days": WINDOW_DAYS}


@router.get("/v1/recommendations", summary="Savings recommendations over the last 30 days, most savings first")
async def recommendations(
    principal: Reader,
    ch: CH,
    settings: SettingsDep,
    catalog: CatalogDep,
    project: Annotated[list[str] | None, Query()] = None,
    agent: Annotated[list[str] | None, Query()] = None,
    user: Annotated[list[str] | None, Query()] = None,
    provider: Annotated[list[str] | None, Query()] = None,
    model: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query(description="key:value, repeatable: all must match")] = None,
    type: Annotated[list[Literal[TYPES]] | None, Query(description="only these kinds")] = None,  # type: ignore[valid-type]
    priority: Annotated[list[Literal["high", "medium", "low"]] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    filters = window_filters(None, scope_dims(project, agent, user, provider, model), tag)
    items = await recommendation_items(ch, catalog, filters, principal.tenant, settings.insights.max_events)
    items = [i for i in items if (not type or i["type"] in type) and (not priority or i["priority"] in priority)]
    return json_response({**_window(filters), "currency": "USD", "recommendations": items[:limit], "count": len(items)})


@router.get("/v1/recommendations/summary", summary="Total estimated monthly savings, by type")
async def recommendations_summary(
    principal: Reader,
    ch: CH,
    settings: SettingsDep,
    catalog: CatalogDep,
    project: Annotated[list[str] | None, Query()] = None,
    agent: Annotated[list[str] | None, Query()] = None,
    user: Annotated[list[str] | None, Query()] = None,
    provider: Annotated[list[str] | None, Query()] = None,
    model: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query()] = None,
) -> Response:
    filters = window_filters(None, scope_dims(project, agent, user, provider, model), tag)
    items = await recommendation_items(ch, catalog, filters, principal.tenant, settings.insights.max_events)
    return json_response({**_window(filters), "currency": "USD", **summary(items)})


def _resolve_targets(catalog: Catalog, text: str, providers: list[str]) -> list[CatalogModel]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(names) > MAX_COMPARED_MODELS:
        raise InvalidField("models", f"1 to {MAX_COMPARED_MODELS} comma-separated model names")
    targets = []
    for name in names:
        found = next((m for p in providers if (m := catalog_model(catalog, p, name)) is not None), None)
        if found is None and "/" in name:
            found = catalog_model(catalog, *name.split("/", 1))
        if found is None:
            found = catalog_model(catalog, "", name)
        if found is None:
            raise InvalidField("models", f"{name[:80]!r} is not a catalog model (use provider/model to be explicit)")
        targets.append(found)
    return list(dict.fromkeys(targets))


def _chat_priced(model: CatalogModel) -> bool:
    """A model priced per input and output token (not an embedding, audio or image model)."""
    rows = model.schedule.rows
    return all(r.bands[0][0] > 0 and r.bands[0][5] > 0 for r in rows)


@router.get("/v1/analytics/cost-comparison", summary="The last 30 days' usage re-priced on other models (price only)")
async def cost_comparison(
    principal: Reader,
    ch: CH,
    settings: SettingsDep,
    catalog: CatalogDep,
    models: Annotated[
        str | None,
        Query(
            description="comma-separated models (provider/model to be explicit); default: every "
            "catalog model of the current providers whose context fits"
        ),
    ] =  # fmt: skip
    None,
    project: Annotated[list[str] | None, Query()] = None,
    agent: Annotated[list[str] | None, Query()] = None,
    user: Annotated[list[str] | None, Query()] = None,
    provider: Annotated[list[str] | None, Query()] = None,
    model: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query()] = None,
) -> Response:
    filters = window_filters(None, scope_dims(project, agent, user, provider, model), tag)
    if models is not None:
        _resolve_targets(catalog, models, [])  # a bad name is refused before any query
    await _check_size(ch, filters, principal.tenant, settings.insights.max_events)
    params = Params()
    current_sql = (
        "SELECT provider, model, count() AS calls, sum(toInt128(cost_nanos)) AS cost_total, "
        "quantileExact(0.99)(input_tokens) AS p99_input_tokens FROM usage_events WHERE "
        + " AND ".join(scope_conditions(filters, principal.tenant, params))
        + " GROUP BY provider, model ORDER BY cost_total DESC, provider, model"
    )
    current = list((await ch.query(current_sql, parameters=params.values, settings=SCAN_LIMITS)).named_results())
    p99 = max((int(r["p99_input_tokens"]) for r in current), default=0)
    providers = list(dict.fromkeys(r["provider"] for r in current))
    if models is not None:
        targets = _resolve_targets(catalog, models, providers)
    else:
        provider_ids = {m.provider_id for r in current if (m := catalog_model(catalog, r["provider"], r["model"]))}
        targets = [
            m for pid in sorted(provider_ids) for m in same_provider_models(catalog, pid)
            if _chat_priced(m) and (context_window(m) or 0) >= p99
        ][:MAX_COMPARED_MODELS]  # fmt: skip
    totals: dict[str, Any] = {}
    if current and targets:
        params = Params()
        costs = {f"t{i}": price_sql(m.schedule) for i, m in enumerate(targets)}
        sql = repriced_sql(filters, principal.tenant, params, [], costs)
        totals = (await ch.query(sql, parameters=params.values, settings=SCAN_LIMITS)).first_item
    current_total = sum(int(r["cost_total"]) for r in current)
    current_view = [
        {"provider": r["provider"], "model": r["model"], "cost_usd": usd(int(r["cost_total"])), "calls": int(r["calls"]),
         "p99_input_tokens": int(r["p99_input_tokens"])}
        for r in current
    ]  # fmt: skip
    compared = []
    for i, m in enumerate(targets):
        cost = int(totals.get(f"t{i}", 0)) if current else 0
        window = context_window(m)
        compared.append({
            "provider": m.provider_id, "model": m.model_id, "cost_usd": usd(cost),
            "difference_usd": usd(cost - current_total), "fits_context": None if window is None else p99 <= window,
            "context_window": window,
        })  # fmt: skip
    compared.sort(key=lambda c: (Decimal(c["cost_usd"]), c["provider"], c["model"]))
    body: dict[str, Any] = {
        **_window(filters), "currency": "USD", "label": "price only",
        "note": "the same events and tokens priced on each model at the catalog price of each event's time; "
                "quality, latency and token counts of another model are not modelled",
        "current_models": current_view, "current_cost_usd": usd(current_total), "models": compared,
    }  # fmt: skip
    if len(current_view) == 1:
        body["current"] = {k: current_view[0][k] for k in ("provider", "model", "cost_usd")}
    return json_response(body)


# -- trends ------------------------------------------------------------------------------------------
MAX_TREND_GROUPS = 10_000


@router.get("/v1/analytics/trends", summary="Week-over-week and month-over-month change, with the biggest movers")
async def trends(
    principal: Reader,
    ch: CH,
    by: Annotated[Literal["project", "agent", "model", "provider"], Query()] = "agent",
    limit: Annotated[int, Query(ge=1, le=1000, description="movers per period")] = 10,
    project: Annotated[list[str] | None, Query()] = None,
    agent: Annotated[list[str] | None, Query()] = None,
    user: Annotated[list[str] | None, Query()] = None,
    provider: Annotated[list[str] | None, Query()] = None,
    model: Annotated[list[str] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query()] = None,
) -> Response:
    now = datetime.now(UTC)
    dims = scope_dims(project, agent, user, provider, model)
    body: dict[str, Any] = {"by": by, "as_of": now.isoformat(), "currency": "USD", "periods": {}}
    for name, days in PERIODS.items():
        sums: list[dict[str, tuple[int, int]]] = []
        totals: list[tuple[int, int]] = []
        for end in (now, now - timedelta(days=days)):
            start = end - timedelta(days=days)
            filters = parse_filters(
                start=start.isoformat(), end=end.isoformat(), tz=None, dims=dims, tags=tag, now=now
            )  # fmt: skip
            rows, _ = await run_usage(
                ch, UsageQuery(filters, group=GroupBy(dimension=by), measures=("cost_nanos", "calls")),
                principal.tenant, order_by="cost_nanos DESC, group_key ASC", limit=MAX_TREND_GROUPS,
            )  # fmt: skip
            groups = {r["group_key"]: (int(r["cost_nanos"]), int(r["calls"])) for r in rows}
            sums.append(groups)
            totals.append((sum(c for c, _ in groups.values()), sum(n for _, n in groups.values())))
        body["periods"][name] = {
            "days": days,
            "current": {"from": (now - timedelta(days=days)).isoformat(), "to": now.isoformat(), **figures(*totals[0])},
            "previous": {
                "from": (now - timedelta(days=2 * days)).isoformat(),
                "to": (now - timedelta(days=days)).isoformat(),
                **figures(*totals[1]),
            },
            "change": change(totals[0], totals[1]),
            "movers": movers(sums[0], sums[1], limit),
        }
    return json_response(body)
