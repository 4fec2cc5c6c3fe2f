"""The registry of aggregate tables: every table a materialized view keeps from ``usage_events``.

One entry per table says what the table is: its name, its time grain (if it buckets time), its
dimensions (the key: GROUP BY of the view and ORDER BY of the table, in order), its measures
(name, ClickHouse type, the aggregate over ``usage_events`` the view writes, and the function
that combines stored rows when reading), the view's name, its projections, and whether analysts
read it through a tenant view. Everything that lists aggregates derives from here: the query
planner (``query_api/usage_sql.py``), the SQL guard's tenant views (``query_api/sqlguard.py``) and
the tests.

The DDL is not generated from the registry: the schema files are forward-only and already applied
(``spendstream/migrate.py``), so the registry describes what they create (after 0009, with Int128
cost sums), and ``tests/integration/test_aggregates_registry.py`` holds the two together on a
database migrated from zero: each table's columns and types in order, its engine, PARTITION BY and
ORDER BY, its view's query, its projections, and no aggregate-like table or view outside the
registry.

Recipe: add an aggregate table
------------------------------
1. Its ``Aggregate`` entry in ``AGGREGATES`` below (reuse ``USAGE_MEASURES`` when it keeps the
   usage measures). With a time grain, ``tenant`` first in its key and every event counted once
   (no ``where``), the query planner uses it by itself for the queries whose filters, grouping
   and measures it holds; with ``tenant_view=True`` POST /v1/sql accepts it.
2. ``clickhouse/schema/NNNN_<what>.sql``, the next number (never edit an applied file; the rules
   are in clickhouse/README.md, "Migrations"). Start it from the entry:
   ``.venv/bin/python -m spendstream.aggregates <table> > clickhouse/schema/NNNN_<what>.sql``
   prints the table (with its projections), its materialized view and, with ``tenant_view``, its
   tenant view; then add the comment explaining the ORDER BY.
   ``tests/integration/test_aggregates_registry.py`` fails until the file and the entry agree.
3. Its row in the table lists of clickhouse/README.md (the table reference, and its key columns
   in backticks; ``tests/unit/test_aggregates.py`` checks the key is there).
4. Regenerate the DDL snapshot: ``SPENDSTREAM_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest
   tests/integration/test_schema.py -k snapshot`` and review its diff.
5. Its tests, if any: measures that are not ``USAGE_MEASURES`` get their meaning stated
   independently in ``tests/integration/test_schema.py`` (``MEASURES``: how ``usage_events``
   computes them), so ``test_retried_insert_changes_no_table_and_mvs_equal_raw`` compares the new
   table with the raw rows as it does every other.

Changing an existing aggregate (a new measure, a wider type) is a new schema file with the ALTERs
(and ``CREATE OR REPLACE VIEW`` of its tenant view, see 0009) plus the entry changed to match.

Nothing else names aggregate tables: the schema tests, the tenant-view lists, the stage tests'
totals and the planner's sources all read this registry. (Deployments that grant analysts direct
ClickHouse access list their tables in ``deploy/compose/clickhouse/users.d/spendstream.xml`` and
deploy/README.md: grant a new public table there if those analysts should read it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from textwrap import indent

from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS

#: the table every aggregate's view reads
RAW_TABLE = "usage_events"
#: Tables that are not aggregates and that analysts read through a tenant view of the same name
#: (clickhouse/schema/0006_tenant_views.sql): the raw events, configuration and alert history.
#: api_keys, webhooks and provider_keys hold secrets or their hashes and have none.
NON_AGGREGATE_TENANT_VIEWS: tuple[str, ...] = (
    RAW_TABLE, "projects", "budgets", "price_overrides", "budget_alerts", "alert_deliveries",
    "project_mappings",  # 0012
    "anomaly_settings",
    "provider_usage_hourly", "provider_costs_daily",  # provider reports (0016), each bucket's current collection
)  # fmt: skip


@dataclass(frozen=True)
class Grain:
    name: str
    seconds: int
    #: the ClickHouse function that takes an event's timestamp to the start of its bucket (UTC)
    bucket_function: str


MINUTE = Grain("minute", 60, "toStartOfMinute")
HOUR = Grain("hour", 3600, "toStartOfHour")
DAY = Grain("day", 86400, "toStartOfDay")


@dataclass(frozen=True)
class Dimension:
    name: str
    type: str
    #: what the view selects from usage_events (or its ARRAY JOIN); the column of the same name if empty
    expression: str = ""

    @property
    def select(self) -> str:
        return f"{self.expression} AS {self.name}" if self.expression else self.name


@dataclass(frozen=True)
class Measure:
    name: str
    type: str
    #: the aggregate over one key's events of usage_events that the view writes
    expression: str
    #: the function that combines stored rows of one key (rows are partial until merged)
    merge: str = "sum"

    @property
    def read(self) -> str:
        """The measure as a query over the table reads it: ``sum(calls)``, ``uniqMerge(users)``."""
        return f"{self.merge}({self.name})"


@dataclass(frozen=True)
class Projection:
    """A projection of the table: the sums of ``measures`` per ``dimensions``."""

    name: str
    dimensions: tuple[str, ...]
    measures: tuple[str, ...]

    def select(self, *, multiline: bool = False) -> str:
        columns = [*self.dimensions, *(f"sum({m})" for m in self.measures)]
        return _query([_select(columns, multiline), f"GROUP BY {', '.join(self.dimensions)}"], multiline)


@dataclass(frozen=True)
class Aggregate:
    table: str
    #: None: not bucketed by time
    grain: Grain | None
    #: the key, in ORDER BY order; also the table's first columns, in the same order
    dimensions: tuple[Dimension, ...]
    #: the table's other columns, in order
    measures: tuple[Measure, ...]
    #: analysts read it through {db}_tenant.<table> (POST /v1/sql)
    tenant_view: bool
    engine: str = "SummingMergeTree"
    partition_by: str = ""
    #: the view's ARRAY JOIN clause over usage_events, if any
    array_join: str = ""
    #: the view's WHERE condition over usage_events, if any
    where: str = ""
    projections: tuple[Projection, ...] = ()

    @property
    def mv(self) -> str:
        return f"{self.table}_mv"

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        """(name, type) of every column, in table order."""
        return tuple((c.name, c.type) for c in (*self.dimensions, *self.measures))

    @property
    def measure_names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.measures)

    @property
    def tagged(self) -> bool:
        """Rows per (tag_key, tag_value) of each event: an event with n tags counts n times, one
        without tags not at all."""
        return {"tag_key", "tag_value"} <= set(self.key)

    @property
    def counts_every_event(self) -> bool:
        """Each event of usage_events counts exactly once (no filter, no ARRAY JOIN)."""
        return not self.where and not self.array_join

    def view_select(self, database: str, *, multiline: bool = False) -> str:
        """The SELECT of the table's materialized view, over ``database``.usage_events."""
        columns = [d.select for d in self.dimensions] + [f"{m.expression} AS {m.name}" for m in self.measures]
        clauses = [_select(columns, multiline), f"FROM {database}.{RAW_TABLE}"]
        if self.array_join:
            clauses.append(f"ARRAY JOIN {self.array_join}")
        if self.where:
            clauses.append(f"WHERE {self.where}")
        clauses.append(f"GROUP BY {', '.join(self.key)}")
        return _query(clauses, multiline)


def _select(columns: list[str], multiline: bool) -> str:
    return "SELECT\n    " + ",\n    ".join(columns) if multiline else "SELECT " + ", ".join(columns)


def _query(clauses: list[str], multiline: bool) -> str:
    return ("\n" if multiline else " ").join(clauses)


# --- the usage measures, the same in every usage_<grain> table ------------------------------------

TOKEN_COLUMNS: tuple[str, ...] = TOKEN_FIELDS
#: the total, then one per cost class; Int128 sums in the aggregates (0009_cost_sums_int128.sql)
COST_COLUMNS: tuple[str, ...] = ("cost_nanos", *(f"cost_{c}_nanos" for c in COST_CLASSES))
#: events stored at cost 0 without a usable price, as the aggregates' ``unpriced`` counts them
UNPRICED_STATUSES = ("unknown_model", "cost_over_cap")
#: +1 for an original or re-priced row of usage_events, -1 for a re-pricing reversal (0017_repricing.sql)
SIGN = "if(correction_kind = 'reversal', -1, 1)"
_UNIQ = "AggregateFunction(uniq, String)"
USAGE_MEASURES: tuple[Measure, ...] = (
    # original rows only: re-pricing's correction rows (0017_repricing.sql) are no new calls
    Measure("calls", "UInt64", "countIf(correction_kind = '')"),
    Measure("errors", "UInt64", "countIf(status = 'error' AND correction_kind = '')"),
    # a reversal row takes back its event's unpriced count; the re-priced row counts as it is priced
    # (UInt64 like the column, so reads over usage_events and over the table have one type)
    Measure("unpriced", "UInt64", f"toUInt64(sumIf({SIGN}, pricing_status IN {UNPRICED_STATUSES!r}))"),
    *(Measure(c, "UInt64", f"sum({c})") for c in TOKEN_COLUMNS),
    # widened before summing: 9,224 events at the per-event cap already pass Int64
    *(Measure(c, "Int128", f"sum(toInt128({c}))") for c in COST_COLUMNS),
    # sum and count of the latencies events reported: average = sum(latency_ms_sum) / sum(latency_count)
    Measure("latency_ms_sum", "UInt64", "sum(ifNull(latency_ms, 0))"),
    Measure("latency_count", "UInt64", "count(latency_ms)"),
    # distinct non-empty users / sessions
    Measure("users", _UNIQ, "uniqStateIf(user, user != '')", merge="uniqMerge"),
    Measure("sessions", _UNIQ, "uniqStateIf(session_id, session_id != '')", merge="uniqMerge"),
)
#: the usage measures a projection can hold and a query can add up (every one but the uniq states)
SUMMED_USAGE_MEASURES: tuple[str, ...] = tuple(m.name for m in USAGE_MEASURES if m.merge == "sum")

_DIMENSION_TYPES = {
    "tenant": "LowCardinality(String)",
    "project": "LowCardinality(String)",
    "agent": "LowCardinality(String)",
    "provider": "LowCardinality(String)",
    "model": "LowCardinality(String)",
    "user": "String",
    "tag_key": "LowCardinality(String)",
    "tag_value": "String",
    "src_partition": "UInt32",
}


def _key(*names: str, grain: Grain | None = None) -> tuple[Dimension, ...]:
    """Dimensions by name; ``bucket`` is the start of the event's ``grain`` bucket."""
    return tuple(
        Dimension("bucket", "DateTime64(3, 'UTC')", f"{grain.bucket_function}(timestamp)")
        if name == "bucket" and grain is not None
        else Dimension(name, _DIMENSION_TYPES[name])
        for name in names
    )


def _usage(table: str, grain: Grain, *key: str, **options) -> Aggregate:
    """A usage_<grain> table: the usage measures per ``key``, monthly partitions, a tenant view."""
    return Aggregate(
        table, grain, _key(*key, grain=grain), USAGE_MEASURES, tenant_view=True,
        partition_by="toYYYYMM(bucket)", **options,
    )  # fmt: skip


#: the same sums without the `user` key (0008_usage_projections_without_user.sql)
_WITHOUT_USER = Projection(
    "without_user", ("tenant", "bucket", "project", "agent", "provider", "model"), SUMMED_USAGE_MEASURES
)

#: Every aggregate table, in the order the schema files create them.
AGGREGATES: tuple[Aggregate, ...] = (
    # no `user`: minute rows would be as many as events
    _usage("usage_minute", MINUTE, "tenant", "bucket", "project", "agent", "provider", "model"),
    _usage("usage_hourly", HOUR, "tenant", "bucket", "project", "agent", "provider", "model", "user",
           projections=(_WITHOUT_USER,)),
    _usage("usage_daily", DAY, "tenant", "bucket", "project", "agent", "provider", "model", "user",
           projections=(_WITHOUT_USER,)),
    _usage("usage_tags_daily", DAY, "tenant", "tag_key", "tag_value", "bucket", "project", "agent", "provider", "model",
           array_join="mapKeys(tags) AS tag_key, mapValues(tags) AS tag_value"),
    # the sink's high-water mark per usage.raw partition (internal: no tenant, no view)
    Aggregate(
        "ingest_progress", None, _key("src_partition"),
        (Measure("max_src_offset", "SimpleAggregateFunction(max, UInt64)", "max(src_offset)", merge="max"),),
        tenant_view=False, engine="AggregatingMergeTree",
    ),
    # models seen without a price and the event-time range to re-price once one exists
    Aggregate(
        "unpriced_models", None, _key("tenant", "provider", "model"),
        (
            Measure("events", "SimpleAggregateFunction(sum, UInt64)", f"sum({SIGN})"),
            Measure("first_seen", "SimpleAggregateFunction(min, DateTime64(3, 'UTC'))", "min(timestamp)", merge="min"),
            Measure("last_seen", "SimpleAggregateFunction(max, DateTime64(3, 'UTC'))", "max(timestamp)", merge="max"),
        ),
        tenant_view=True, engine="AggregatingMergeTree", where="pricing_status = 'unknown_model'",
    ),
)  # fmt: skip

#: Every view of the tenant database that analysts may read (POST /v1/sql), each named like its table.
TENANT_VIEWS: frozenset[str] = frozenset(NON_AGGREGATE_TENANT_VIEWS) | {a.table for a in AGGREGATES if a.tenant_view}


def draft_migration(aggregate: Aggregate) -> str:
    """The statements of a new schema file creating ``aggregate`` as its entry describes it (table
    with projections, view, tenant view), with ``{db}`` for the database: a starting point, to which
    the file adds the comment explaining the ORDER BY. Applied files are never regenerated."""
    width = max(len(name) for name, _ in aggregate.columns)
    columns = ",\n".join(f"    {name.ljust(width)} {type_}" for name, type_ in aggregate.columns)
    projections = "".join(
        f",\n    PROJECTION {p.name}\n    (\n" + indent(p.select(multiline=True), " " * 8) + "\n    )"
        for p in aggregate.projections
    )
    # one column bare: ClickHouse would keep `(x)` as a one-element tuple key
    order_by = f"({', '.join(aggregate.key)})" if len(aggregate.key) > 1 else aggregate.key[0]
    settings = ["non_replicated_deduplication_window = 1000"]
    if aggregate.projections:  # a merge of summed rows must rebuild each part's projections
        settings.append("deduplicate_merge_projection_mode = 'rebuild'")
    table = (
        f"CREATE TABLE IF NOT EXISTS {{db}}.{aggregate.table}\n(\n{columns}{projections}\n)\n"
        f"ENGINE = {aggregate.engine}\n"
        + (f"PARTITION BY {aggregate.partition_by}\n" if aggregate.partition_by else "")
        + f"ORDER BY {order_by}\nSETTINGS {', '.join(settings)};\n"
    )
    select = aggregate.view_select("{db}", multiline=True)
    view = f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{aggregate.mv} TO {{db}}.{aggregate.table} AS\n{select};\n"
    tenant_view = (
        f"CREATE VIEW IF NOT EXISTS {{db}}_tenant.{aggregate.table} AS\nSELECT * FROM {{db}}.{aggregate.table}\n"
        "WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);\n"
    )
    return "\n".join([table, view, *([tenant_view] if aggregate.tenant_view else [])])


if __name__ == "__main__":
    import sys

    by_name = {a.table: a for a in AGGREGATES}
    if len(sys.argv) != 2 or sys.argv[1] not in by_name:
        sys.exit(f"usage: python -m spendstream.aggregates TABLE (one of {', '.join(by_name)})")
    print(draft_migration(by_name[sys.argv[1]]), end="")
