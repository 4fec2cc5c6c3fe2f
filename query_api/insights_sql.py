"""SQL for recommendations and cost comparison: usage summaries of the last 30 days and exact
re-pricings of every event on another model, computed by ClickHouse. Pure string building.

A price expression prices one ``usage_events`` row as ``spendstream.pricing.price`` does: the
catalog row in force at the event's time (date intervals, then time-of-day windows), the band of
its ``input_tokens``, the integer rates of the disjoint token classes times their counts plus the
per-request rate, rounded once half to even to a nano-USD, and 0 above the per-event cap. Rates
are integers from the compiled catalog, written into the SQL as literals (never user input);
everything from the request is a bound parameter. Sums are Int128.
"""

from __future__ import annotations

from query_api.filters import Filters, Params, attribute_conditions, instant_param, tenant_condition
from spendstream.aggregates import UNPRICED_STATUSES
from spendstream.insights.recommendations import BATCH_TAG_VALUES
from spendstream.money import MAX_EVENT_COST_NANOS
from spendstream.pricing.catalog import PriceRow, PriceSchedule

#: the disjoint token classes of catalog.ATOMS as expressions over a usage_events row
_ATOM_SQL = (
    "(toInt128(input_tokens) - cache_read_tokens - cache_write_tokens - input_audio_tokens)",
    "toInt128(cache_read_tokens)",
    "(toInt128(cache_write_tokens) - cache_write_1h_tokens)",
    "toInt128(cache_write_1h_tokens)",
    "toInt128(input_audio_tokens)",
    "(toInt128(output_tokens) - reasoning_tokens - output_audio_tokens)",
    "toInt128(reasoning_tokens)",
    "toInt128(output_audio_tokens)",
)
OK = "status != 'error'"
_US_PER_DAY = 86_400_000_000


def _band_sql(row: PriceRow, band: int) -> str:
    rates = row.bands[band]
    terms = [f"{atom} * {rate}" for atom, rate in zip(_ATOM_SQL, rates[:8]) if rate]
    if rates[8]:
        terms.append(f"toInt128({rates[8]})")
    exact = " + ".join(terms) if terms else "toInt128(0)"
    if row.scale == 1:
        return f"({exact})"
    s = row.scale
    # round half to even of a non-negative x / s
    return (
        f"(intDiv({exact}, {s}) + if((({exact}) % {s}) * 2 > {s} OR "
        f"((({exact}) % {s}) * 2 = {s} AND intDiv({exact}, {s}) % 2 = 1), 1, 0))"
    )


def row_sql(row: PriceRow, *, one_tier_lower: bool = False) -> str:
    """One event's cost at ``row``: its band by input_tokens (or the band below it)."""
    n = len(row.thresholds)
    if not n:
        return _band_sql(row, 0)
    cases = []
    for band in range(n, 0, -1):  # "input_tokens > start" selects a tier, highest first
        cases.append(
            f"input_tokens > {row.thresholds[band - 1]}, {_band_sql(row, band - 1 if one_tier_lower else band)}"
        )
    return f"multiIf({', '.join(cases)}, {_band_sql(row, 0)})"


def _window_condition(start_us: int, end_us: int) -> str:
    us = f"(toUnixTimestamp64Micro(timestamp) % {_US_PER_DAY})"
    if end_us < start_us:
        return f"({us} >= {start_us} OR {us} < {end_us})"
    return f"({us} >= {start_us} AND {us} < {end_us})"


def price_sql(schedule: PriceSchedule, *, one_tier_lower: bool = False) -> str:
    """One event's cost at the catalog price of ``schedule`` in force at its timestamp, nano-USD."""
    if schedule.fixed is not None:
        cost = row_sql(schedule.fixed, one_tier_lower=one_tier_lower)
    else:
        per_interval = []
        for windows, default in zip(schedule.windows, schedule.defaults):
            expr = row_sql(default, one_tier_lower=one_tier_lower)
            if windows:
                cases = [f"{_window_condition(w.start_us, w.end_us)}, {row_sql(w.row, one_tier_lower=one_tier_lower)}"
                         for w in windows]  # fmt: skip
                expr = f"multiIf({', '.join(cases)}, {expr})"
            per_interval.append(expr)
        cases = [
            f"toDate(timestamp) < toDate('{bound}'), {expr}" for bound, expr in zip(schedule.date_bounds, per_interval)
        ]
        cost = f"multiIf({', '.join(cases)}, {per_interval[-1]})" if cases else per_interval[0]
    return f"if(({cost}) > {MAX_EVENT_COST_NANOS}, toInt128(0), toInt128({cost}))"


def near_tier_condition(schedule: PriceSchedule, margin_num: int, margin_den: int) -> str | None:
    """Events whose input is above one of the model's tier thresholds by at most the margin."""
    thresholds = sorted({t for row in schedule.rows for t in row.thresholds})
    if not thresholds:
        return None
    return "(" + " OR ".join(
        f"(input_tokens > {t} AND input_tokens <= {t + t * margin_num // margin_den})" for t in thresholds
    ) + ")"  # fmt: skip


def scope_conditions(filters: Filters, tenant: str, params: Params, *, priced_only: bool = True) -> list[str]:
    conds = [
        tenant_condition(tenant, params),
        f"timestamp >= {instant_param(filters.start, params, 'from')}",
        f"timestamp < {instant_param(filters.end, params, 'to')}",
        *attribute_conditions(filters, params),
    ]
    if priced_only:  # events stored at cost 0 without a price have no cost to compare
        conds.append(f"pricing_status NOT IN {UNPRICED_STATUSES!r}")
    return conds


TOKEN_SUMS = (
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens",
    "reasoning_tokens", "input_audio_tokens", "output_audio_tokens",
)  # fmt: skip


def usage_summary_sql(filters: Filters, tenant: str, params: Params, limit: int) -> str:
    """Per (agent, project, provider, model), most expensive first: calls, costs, token sums of
    the successful calls, their mean output and p99 input, active days, batch-tagged calls."""
    tokens = ", ".join(f"sumIf({c}, {OK}) AS ok_{c}" for c in TOKEN_SUMS)
    tag_values = params.add(list(BATCH_TAG_VALUES), "Array(String)", "batch_values")
    return (
        "SELECT agent, project, provider, model, count() AS calls, countIf(status = 'error') AS error_calls, "
        "sum(toInt128(cost_nanos)) AS cost_total, sumIf(toInt128(cost_nanos), status = 'error') AS error_cost_nanos, "
        f"{tokens}, avgIf(output_tokens, {OK}) AS mean_output_tokens, "
        f"quantileExactIf(0.99)(input_tokens, {OK}) AS p99_input_tokens, "
        "uniqExact(toDate(timestamp)) AS active_days, "
        f"countIf(lower(tags['batch']) IN {tag_values}) AS batch_tagged_calls "
        f"FROM usage_events WHERE {' AND '.join(scope_conditions(filters, tenant, params))} "
        "GROUP BY agent, project, provider, model "
        f"ORDER BY cost_total DESC, agent, project, provider, model LIMIT {params.add(limit, 'UInt32', 'limit')}"
    )


def hourly_calls_sql(filters: Filters, tenant: str, params: Params) -> str:
    """Per (agent, project, provider, model): the calls of each active hour (at most 24 * 31)."""
    return (
        "SELECT agent, project, provider, model, groupArray(c) AS hourly_calls FROM ("
        "SELECT agent, project, provider, model, toStartOfHour(timestamp) AS h, count() AS c FROM usage_events "
        f"WHERE {' AND '.join(scope_conditions(filters, tenant, params))} GROUP BY agent, project, provider, model, h"
        ") GROUP BY agent, project, provider, model"
    )


def repriced_sql(filters: Filters, tenant: str, params: Params, keys: list[str], costs: dict[str, str]) -> str:
    """Sums of named per-event expressions (``costs``: alias -> expression) per ``keys``."""
    columns = [*keys, *(f"sum({expr}) AS {alias}" for alias, expr in costs.items())]
    sql = (
        f"SELECT {', '.join(columns)} FROM usage_events WHERE {' AND '.join(scope_conditions(filters, tenant, params))}"
    )
    return sql + (f" GROUP BY {', '.join(keys)}" if keys else "")


#: FinOps FOCUS 1.2 columns written by ``GET /v1/analytics/export?format=focus`` (docs/insights.md),
#: one row per (day in the request's zone, project, agent, provider, model); ``x_`` columns are
#: Spendstream's own, as FOCUS names custom columns.
FOCUS_VERSION = "1.2"


def _utc(expr: str) -> str:
    """FOCUS date-times: ISO 8601 in UTC (the period boundaries are the local midnights of the zone)."""
    return f"formatDateTime(toTimeZone({expr}, 'UTC'), '%Y-%m-%dT%H:%i:%SZ')"


def focus_sql(built_sql: str, tz_placeholder: str, tenant_placeholder: str) -> str:
    """The FOCUS projection of a usage query with day buckets split by project, agent, provider
    and model (``bucket_start`` epoch seconds of the local day)."""
    usd = "toDecimal128(cost_nanos, 9) / 1000000000"
    start = f"toDateTime(bucket_start, {tz_placeholder})"
    month = f"toStartOfMonth({start})"
    columns = [
        f"{usd} AS BilledCost",
        f"{usd} AS EffectiveCost",
        f"{usd} AS ListCost",
        f"{usd} AS ContractedCost",
        "'USD' AS BillingCurrency",
        f"{tenant_placeholder} AS BillingAccountId",
        f"{tenant_placeholder} AS BillingAccountName",
        f"{_utc(f'toDateTime({month}, {tz_placeholder})')} AS BillingPeriodStart",
        f"{_utc(f'toDateTime(addMonths({month}, 1), {tz_placeholder})')} AS BillingPeriodEnd",
        f"{_utc(start)} AS ChargePeriodStart",
        f"{_utc(f'toDateTime(addDays(toDate({start}), 1), {tz_placeholder})')} AS ChargePeriodEnd",
        "'Usage' AS ChargeCategory",
        "'Usage-Based' AS ChargeFrequency",
        "concat(provider, ' ', model, ' tokens for agent ', agent) AS ChargeDescription",
        "provider AS ProviderName",
        "provider AS PublisherName",
        "provider AS InvoiceIssuerName",
        "'AI and Machine Learning' AS ServiceCategory",
        "model AS ServiceName",
        "concat(provider, '/', model) AS SkuId",
        "agent AS ResourceId",
        "agent AS ResourceName",
        "'AI Agent' AS ResourceType",
        "project AS SubAccountId",
        "project AS SubAccountName",
        "input_tokens + output_tokens AS ConsumedQuantity",
        "'Tokens' AS ConsumedUnit",
        "input_tokens + output_tokens AS PricingQuantity",
        "'Tokens' AS PricingUnit",
        "toJSONString(map('spendstream/project', project, 'spendstream/agent', agent)) AS Tags",
        "calls AS x_Calls",
        "input_tokens AS x_InputTokens",
        "output_tokens AS x_OutputTokens",
        "cost_nanos AS x_CostNanos",
    ]
    return (
        f"SELECT {', '.join(columns)} FROM ({built_sql}) "
        "ORDER BY bucket_start, SubAccountId, ResourceId, ProviderName, ServiceName"
    )
