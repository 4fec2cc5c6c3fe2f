"""SQL for usage analytics, built from a plan: which table answers each time segment, with which
keys and measures. Pure string building; every value from a request is a bound parameter.

A query is the UNION ALL of one sub-select per table that answers some segment of the range (see
``logic.plan_segments``), each summing the measures of its own rows, and an outer select adding
them up per key. The tables that can answer are the time-bucketed usage aggregates of the registry
(``spendstream.aggregates``, kept by materialized views); they hold partial sums until merged, so
they are always read with ``sum()`` and GROUP BY.

Cost sums are Int128 everywhere (clickhouse/schema/0009_*.sql): the aggregates' cost columns are,
and sums over ``usage_events`` (Int64 per event) widen each value first, since 9,224 events at
the per-event cap already exceed Int64. A sum beyond Int64 comes back as an exact Python int;
``logic.money`` keeps it exact in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from query_api.errors import InvalidField
from query_api.filters import DIMENSIONS, Filters, Params, attribute_conditions, instant_param, tenant_condition
from query_api.logic import RAW, coarsest_grain, plan_segments
from spendstream.aggregates import AGGREGATES as REGISTRY
from spendstream.aggregates import COST_COLUMNS as COST_COLUMNS  # the routers' names for them
from spendstream.aggregates import RAW_TABLE, USAGE_MEASURES, Aggregate
from spendstream.aggregates import TOKEN_COLUMNS as TOKEN_COLUMNS

#: measure -> (expression over an aggregate table, expression over usage_events); the usage
#: measures that add up (the uniq states do not)
MEASURES: dict[str, tuple[str, str]] = {m.name: (m.read, m.expression) for m in USAGE_MEASURES if m.merge == "sum"}
#: what timeseries and breakdowns show. Every measure is a column read from each aggregate row, and
#: on a 90-day range that read is most of a query's time: the full set costs about twice this one.
CORE_MEASURES: tuple[str, ...] = (
    "calls",
    "errors",
    "unpriced",
    "cost_nanos",
    "input_tokens",
    "output_tokens",
    "latency_ms_sum",
    "latency_count",
)
#: the overview adds every token class
OVERVIEW_MEASURES: tuple[str, ...] = CORE_MEASURES + tuple(c for c in TOKEN_COLUMNS if c not in CORE_MEASURES)


@dataclass(frozen=True)
class Source:
    table: str
    grain: int
    time_column: str
    dims: frozenset[str]
    #: rows are per (tag_key, tag_value): answers at most one tag (a filter or a breakdown key)
    tagged: bool = False
    measures: frozenset[str] = frozenset(MEASURES)


def _answers_usage(a: Aggregate) -> bool:
    """Time buckets per tenant over every event (or over every tag of every event)."""
    return a.grain is not None and a.key[0] == "tenant" and (a.counts_every_event or a.tagged)


RAW_SOURCE = Source(RAW_TABLE, RAW, "timestamp", frozenset(DIMENSIONS))
#: the registry's usage aggregates; for one query and grain the first that can answer it is read
AGGREGATES: tuple[Source, ...] = tuple(
    Source(a.table, a.grain.seconds, "bucket", frozenset(DIMENSIONS) & set(a.key), a.tagged,
           frozenset(MEASURES) & a.measure_names)
    for a in REGISTRY
    if _answers_usage(a)
)  # fmt: skip


@dataclass(frozen=True)
class GroupBy:
    """A breakdown key: a dimension, or the value of one tag."""

    dimension: str | None = None
    tag_key: str | None = None

    @classmethod
    def parse(cls, by: str) -> GroupBy:
        if by.startswith("tag:"):
            key = by[4:]
            if not key:
                raise InvalidField("by", "tag breakdowns need a key: tag:<key>")
            return cls(tag_key=key)
        if by not in DIMENSIONS:
            raise InvalidField("by", f"expected one of {', '.join(DIMENSIONS)} or tag:<key>")
        return cls(dimension=by)


@dataclass(frozen=True)
class UsageQuery:
    filters: Filters
    group: GroupBy | None = None
    granularity: str | None = None
    #: False answers everything from usage_events (the benchmark's baseline)
    use_aggregates: bool = True
    measures: tuple[str, ...] = CORE_MEASURES
    #: dimensions grouped by as well, each a column of its own name (forecasts re-price per model)
    split_by: tuple[str, ...] = ()


def _tag_keys(q: UsageQuery) -> set[str]:
    keys = {k for k, _ in q.filters.tags}
    if q.group and q.group.tag_key is not None:
        keys.add(q.group.tag_key)
    return keys


def eligible_sources(q: UsageQuery) -> dict[int, Source]:
    """The aggregate per grain that can answer ``q`` exactly (raw events answer anything)."""
    if not q.use_aggregates:
        return {}
    needed = set(q.filters.dimension_names())
    if q.group and q.group.dimension:
        needed.add(q.group.dimension)
    needed.update(q.split_by)
    tag_keys = _tag_keys(q)
    # one tag key with at most one value filter: the tag table has one row per (key, value)
    single_tag = len(tag_keys) == 1 and len(q.filters.tags) <= 1
    if tag_keys and not single_tag:
        return {}
    coarsest = coarsest_grain(q.granularity, q.filters.tz, q.filters.start, q.filters.end)
    chosen: dict[int, Source] = {}
    for src in AGGREGATES:
        if src.grain > coarsest or not needed <= src.dims or src.tagged != bool(tag_keys):
            continue
        if not set(q.measures) <= src.measures:
            continue
        chosen.setdefault(src.grain, src)
    return chosen


def bucket_expression(granularity: str, column: str, params: Params, tz: ZoneInfo) -> str:
    """Epoch seconds of the start, in ``tz``, of the bucket holding ``column``."""
    if granularity == "minute":
        return f"toUnixTimestamp(toStartOfMinute({column}))"
    zone = params.add(tz.key, "String", "tz")
    local = f"toTimeZone({column}, {zone})"
    return {
        "hour": f"toUnixTimestamp(toStartOfHour({local}))",
        "day": f"toUnixTimestamp(toStartOfDay({local}))",
        "week": f"toUnixTimestamp(toDateTime(toMonday({local}), {zone}))",
        "month": f"toUnixTimestamp(toDateTime(toStartOfMonth({local}), {zone}))",
    }[granularity]


@dataclass
class Built:
    sql: str
    params: dict[str, object]
    #: the tables that answer the query, in the time order of their first segment
    tables: list[str] = field(default_factory=list)


def _source_select(
    q: UsageQuery, src: Source, ranges: list[tuple[datetime, datetime]], tenant: str, params: Params
) -> str:
    """One table's part: its time ranges ORed (the primary key still narrows to each range)."""
    keys = []
    if q.granularity:
        keys.append(f"{bucket_expression(q.granularity, src.time_column, params, q.filters.tz)} AS bucket_start")
    t = src.time_column
    spans = [
        f"{t} >= {instant_param(start, params, 'from')} AND {t} < {instant_param(end, params, 'to')}"
        for start, end in ranges
    ]
    conds = [
        tenant_condition(tenant, params),
        spans[0] if len(spans) == 1 else "(" + " OR ".join(f"({s})" for s in spans) + ")",
        *attribute_conditions(q.filters, params, tag_columns=src.tagged),
    ]
    if q.group and q.group.dimension:
        keys.append(f"`{q.group.dimension}` AS group_key")
    elif q.group and q.group.tag_key is not None:
        k = params.add(q.group.tag_key, "String", "group_tag")
        if src.tagged:
            conds.append(f"tag_key = {k}")
            keys.append("tag_value AS group_key")
        else:
            conds.append(f"mapContains(tags, {k})")
            keys.append(f"tags[{k}] AS group_key")
    keys += [f"`{d}` AS {d}" for d in q.split_by]
    measures = [f"{MEASURES[m][0] if src.grain else MEASURES[m][1]} AS {m}" for m in q.measures]
    sql = f"SELECT {', '.join(keys + measures)} FROM {src.table} WHERE {' AND '.join(conds)}"
    if keys:
        sql += " GROUP BY " + ", ".join(k.rsplit(" AS ", 1)[1] for k in keys)
    return sql


def build_usage_query(q: UsageQuery, tenant: str, *, order_by: str | None = None, limit: int | None = None) -> Built:
    """The SQL answering ``q`` for ``tenant``: one row per key (bucket and/or group), ``q.measures``.

    Segments of the same grain (the two ragged ends of a range) share one sub-select: every
    sub-select has a fixed planning cost, which dominates small reads.
    """
    sources = eligible_sources(q)
    by_source: dict[Source, list[tuple[datetime, datetime]]] = {}
    for seg in plan_segments(q.filters.start, q.filters.end, sources):
        by_source.setdefault(sources.get(seg.grain, RAW_SOURCE), []).append((seg.start, seg.end))
    params = Params()
    parts = [_source_select(q, src, ranges, tenant, params) for src, ranges in by_source.items()]
    tables = [src.table for src in by_source]
    keys = (["bucket_start"] if q.granularity else []) + (["group_key"] if q.group else []) + list(q.split_by)
    outer = ", ".join(keys + [f"sum({m}) AS {m}" for m in q.measures])
    sql = f"SELECT {outer} FROM ({' UNION ALL '.join(parts)})"
    if keys:
        sql += " GROUP BY " + ", ".join(keys)
    if order_by:
        sql += f" ORDER BY {order_by}"
    if limit is not None:
        sql += f" LIMIT {params.add(limit, 'UInt32', 'limit')}"
    return Built(sql, params.values, tables)
