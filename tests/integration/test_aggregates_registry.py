"""The registry of aggregate tables (spendstream/aggregates.py) holds the schema files to itself.

On a database migrated from zero: every registry table exists with exactly the registry's columns
and types in order, engine, PARTITION BY and ORDER BY (= its dimensions) and deduplication window;
its view writes it with exactly the registry's query; its projections are the registry's; and no
aggregate-like table or view exists outside the registry (a table added without its entry fails
here, and an entry without its table). Then the same holds for a database created from the
registry's drafts (``draft_migration``), the starting point of a new schema file.

That every aggregate's figures equal the raw rows is tests/integration/test_schema.py's
``test_retried_insert_changes_no_table_and_mvs_equal_raw``, which also reads the registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spendstream.aggregates import (
    AGGREGATES,
    RAW_TABLE,
    TENANT_VIEWS,
    Aggregate,
    draft_migration,
)
from spendstream.clickhouse import get_client
from spendstream.migrate import apply_migrations, render, split_statements
from spendstream.settings import Settings

pytestmark = pytest.mark.clickhouse

#: engines of tables that hold partial aggregates (rows are combined when parts merge)
AGGREGATING_ENGINES = {"SummingMergeTree", "AggregatingMergeTree"}
DEDUPLICATION_WINDOW = "non_replicated_deduplication_window = 1000"


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    c = get_client(make_settings(), database="system")
    yield c
    c.close()


@pytest.fixture(scope="module")
def migrated(client, make_settings: Callable[..., Settings]) -> Iterator[str]:
    """A database migrated from zero by the schema files."""
    settings = make_settings()
    apply_migrations(client, settings, echo=lambda _line: None)
    yield settings.clickhouse.database
    _drop(client, settings.clickhouse.database)


def _drop(client, database: str) -> None:
    for name in (database, f"{database}_tenant"):
        client.command(f"DROP DATABASE IF EXISTS {name}")


def _rows(client, sql: str, **parameters) -> list[tuple]:
    return [tuple(r) for r in client.query(sql, parameters=parameters).result_rows]


def _format(client, sql: str) -> str:
    return client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": sql}).result_rows[0][0]


def _table(client, database: str, name: str) -> dict[str, Any]:
    result = client.query(
        "SELECT engine, engine_full, sorting_key, partition_key, create_table_query, as_select "
        "FROM system.tables WHERE database = {db:String} AND name = {name:String}",
        parameters={"db": database, "name": name},
    )
    assert result.result_rows, f"{database}.{name} does not exist"
    return dict(zip(result.column_names, result.result_rows[0]))


def observed(client, database: str, aggregate: Aggregate) -> dict[str, Any]:
    """What ``database`` holds for ``aggregate``'s table and view."""
    table, view = _table(client, database, aggregate.table), _table(client, database, aggregate.mv)
    of_table = "WHERE database = {db:String} AND table = {t:String}"
    columns = _rows(
        client, f"SELECT name, type FROM system.columns {of_table} ORDER BY position", db=database, t=aggregate.table
    )
    projections = _rows(
        client, f"SELECT name, query FROM system.projections {of_table} ORDER BY name", db=database, t=aggregate.table
    )
    return {
        "columns": columns,
        "engine": table["engine"],
        "order_by": table["sorting_key"],
        "partition_by": table["partition_key"],
        "deduplication_window": DEDUPLICATION_WINDOW in table["engine_full"],
        "view_engine": view["engine"],
        "view_target": re.search(rf"\bTO {database}\.(\w+)", view["create_table_query"])[1],
        # the columns the view's SELECT produces, in order (they must be the target's, in order)
        "view_writes": [r[0] for r in _rows(client, f"DESCRIBE ({view['as_select']})")],
        "view_query": view["as_select"],
        "projections": projections,
    }


def expected(client, database: str, aggregate: Aggregate) -> dict[str, Any]:
    """The same, as the registry describes it."""
    return {
        "columns": list(aggregate.columns),
        "engine": aggregate.engine,
        "order_by": ", ".join(aggregate.key),
        "partition_by": aggregate.partition_by,
        "deduplication_window": True,
        "view_engine": "MaterializedView",
        "view_target": aggregate.table,
        "view_writes": [name for name, _ in aggregate.columns],
        "view_query": _format(client, aggregate.view_select(database)),
        "projections": sorted((p.name, _format(client, p.select())) for p in aggregate.projections),
    }


@pytest.mark.parametrize("aggregate", AGGREGATES, ids=lambda a: a.table)
def test_schema_files_create_each_aggregate_as_the_registry_describes_it(client, migrated: str, aggregate) -> None:
    assert observed(client, migrated, aggregate) == expected(client, migrated, aggregate)


def test_no_aggregate_table_or_view_outside_the_registry(client, migrated: str) -> None:
    tables = _rows(
        client, "SELECT name, engine, create_table_query FROM system.tables WHERE database = {db:String}", db=migrated
    )
    aggregating = {name for name, engine, _ in tables if engine in AGGREGATING_ENGINES}
    assert aggregating == {a.table for a in AGGREGATES}
    # every materialized view but the sink's way into usage_events keeps an aggregate
    targets = {
        name: re.search(rf"\bTO {migrated}\.(\w+)", create)[1]
        for name, engine, create in tables
        if engine == "MaterializedView"
    }
    assert {name: target for name, target in targets.items() if target != RAW_TABLE} == {
        a.mv: a.table for a in AGGREGATES
    }
    views = _rows(client, "SELECT name FROM system.tables WHERE database = {db:String}", db=f"{migrated}_tenant")
    assert {name for (name,) in views} == TENANT_VIEWS | {"current_tenant"}


def test_drafted_migrations_create_what_the_registry_describes(client, migrated: str, make_settings) -> None:
    """Each entry's draft, applied as the migrator applies a file (split, ``{db}`` rendered) next to
    a usage_events and a current_tenant view like the real ones, creates the same as the files."""
    draft = make_settings().clickhouse.database
    try:
        client.command(f"CREATE DATABASE {draft}")
        client.command(f"CREATE TABLE {draft}.{RAW_TABLE} AS {migrated}.{RAW_TABLE}")
        client.command(f"CREATE DATABASE {draft}_tenant")
        current = client.query(f"SHOW CREATE TABLE {migrated}_tenant.current_tenant").result_rows[0][0]
        client.command(current.replace(migrated, draft))
        for aggregate in AGGREGATES:
            for statement in split_statements(draft_migration(aggregate)):
                client.command(render(statement, draft))
        for aggregate in AGGREGATES:
            assert observed(client, draft, aggregate) == expected(client, draft, aggregate), aggregate.table
        views = _rows(client, "SELECT name FROM system.tables WHERE database = {db:String}", db=f"{draft}_tenant")
        assert {name for (name,) in views} == {a.table for a in AGGREGATES if a.tenant_view} | {"current_tenant"}
    finally:
        _drop(client, draft)
