"""The cluster form derived from clickhouse/schema/*.sql, and the migrator's statement splitter.

That every derived statement also parses in ClickHouse is checked in
tests/integration/test_schema.py (formatQuery in the embedded engine)."""

from __future__ import annotations

import re

import pytest

from spendstream.aggregates import AGGREGATES, TENANT_VIEWS
from spendstream.migrate import BOOTSTRAP, MigrationError, load_migrations, split_statements
from spendstream.schema_cluster import ClusterSchemaError, cluster_statements

CLUSTER = "prod"
ON = "ON CLUSTER 'prod'"


def _all_statements() -> list[str]:
    return [s for m in load_migrations() for s in m.statements]


def _create_statements() -> list[str]:
    return [s for s in _all_statements() if s.startswith("CREATE ")]


def _created(statement: str) -> tuple[str, str]:
    """(kind, name) of a CREATE statement (``CREATE OR REPLACE VIEW`` is a VIEW)."""
    m = re.match(r"CREATE (?:(TABLE|MATERIALIZED VIEW|VIEW|DATABASE) IF NOT EXISTS|OR REPLACE (VIEW)) (\S+)", statement)
    assert m, statement[:120]
    return m[1] or m[2], m[3]


def test_every_statement_of_every_file_has_a_cluster_form_on_the_cluster() -> None:
    statements = _all_statements()
    assert len(statements) >= 30
    for statement in statements:
        derived = cluster_statements(statement, CLUSTER)
        assert derived
        for sql in derived:
            assert f" {ON} " in sql + " ", sql[:160]


def test_tables_become_replicated_local_tables_behind_distributed_ones_with_the_public_name() -> None:
    tables = [s for s in _create_statements() if _created(s)[0] == "TABLE"]
    assert {_created(s)[1] for s in tables} >= {"{db}.usage_events", "{db}.usage_daily", "{db}.api_keys"}
    for statement in tables:
        name = _created(statement)[1]
        local, distributed = cluster_statements(statement, CLUSTER)
        assert _created(local)[1] == f"{name}_local"
        engine = re.search(r"ENGINE = (\w+)", statement)[1]
        short = name.removeprefix("{db}.")
        if engine == "Null":  # stores nothing: nothing to replicate
            assert local.endswith("\nENGINE = Null")
        else:
            assert (
                f"ENGINE = Replicated{engine}('/clickhouse/tables/{{shard}}/{{database}}/{{table}}', '{{replica}}'"
                in local
            )
        assert f"{name} {ON} AS {name}_local" in distributed
        sharding = ", cityHash64(tenant)" if re.search(r"^\s*tenant\s", statement, re.M) else ""
        assert distributed.endswith(f"ENGINE = Distributed('prod', '{{db}}', '{short}_local'{sharding})")
        # the column list and everything after the engine (PARTITION/ORDER BY, SETTINGS) are kept
        assert _columns(local) == _columns(statement)
        if engine != "Null":
            assert _after_engine(local) == _after_engine(statement)


def _columns(sql: str) -> str:
    return sql[sql.index("(") : sql.index("\nENGINE")]


def _after_engine(sql: str) -> str:
    return sql[sql.index("\n", sql.index("ENGINE")) :].strip()


def test_engine_arguments_follow_the_replication_arguments() -> None:
    statement = next(s for s in _all_statements() if "{db}.budgets\n" in s)
    local, _ = cluster_statements(statement, CLUSTER)
    assert (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', version, deleted)"
        in local
    )


def test_materialized_views_read_and_write_the_local_tables() -> None:
    mvs = [s for s in _create_statements() if _created(s)[0] == "MATERIALIZED VIEW"]
    # each aggregate's view once, and the sink's way in (usage_events_in -> usage_events)
    expected = [a.mv for a in AGGREGATES] + ["usage_events_in_mv"]
    assert sorted(_created(s)[1] for s in mvs) == sorted(f"{{db}}.{name}" for name in expected)
    for statement in mvs:
        (derived,) = cluster_statements(statement, CLUSTER)
        target = re.search(r"\bTO \{db\}\.(\w+)", statement)[1]
        source = re.search(r"\bFROM \{db\}\.(\w+)", statement)[1]
        assert f"{ON} TO {{db}}.{target}_local AS" in derived
        assert f"FROM {{db}}.{source}_local" in derived
        assert derived.count("_local") == 2


def test_tenant_views_stay_on_the_public_distributed_names() -> None:
    views = [s for s in _create_statements() if _created(s)[0] == "VIEW"]
    # each tenant view once; 0009 creates the four aggregate views again over their Int128 cost columns,
    # 0012 the usage_events view over the session columns, 0015 the budget_alerts view with its new
    # column and 0017 usage_events' with its correction columns
    assert {_created(s)[1] for s in views} == {f"{{db}}_tenant.{v}" for v in TENANT_VIEWS | {"current_tenant"}}
    assert len(views) == len(TENANT_VIEWS | {"current_tenant"}) + 7
    assert sum(s.startswith("CREATE OR REPLACE VIEW") for s in views) == 7
    for statement in views:
        (derived,) = cluster_statements(statement, CLUSTER)
        assert "_local" not in derived
        assert derived == statement.replace(_created(statement)[1], f"{_created(statement)[1]} {ON}", 1)
    replace = "CREATE OR REPLACE VIEW {db}_tenant.usage_events AS SELECT * FROM {db}.usage_events"
    assert cluster_statements(replace, CLUSTER) == [replace.replace("usage_events AS", f"usage_events {ON} AS", 1)]


def test_a_view_query_change_runs_on_the_view_itself_reading_the_local_source() -> None:
    changes = [s for s in _all_statements() if re.match(r"ALTER TABLE \S+ MODIFY QUERY", s)]
    assert {re.match(r"ALTER TABLE (\S+)", s)[1] for s in changes} == {
        "{db}.usage_minute_mv",
        "{db}.usage_hourly_mv",
        "{db}.usage_daily_mv",
        "{db}.usage_tags_daily_mv",
        "{db}.usage_events_in_mv",  # 0012: the session columns; 0017: re-pricing's correction columns
        "{db}.unpriced_models_mv",  # 0017
    }
    for statement in changes:
        (derived,) = cluster_statements(statement, CLUSTER)
        view = re.match(r"ALTER TABLE (\S+)", statement)[1]
        # a materialized view keeps its name on the cluster (only tables get a _local twin)
        assert derived.startswith(f"ALTER TABLE {view} {ON} MODIFY QUERY")
        source = re.search(r"\bFROM \{db\}\.(\w+)", statement)[1]  # usage_events; usage_events_in for its view
        assert f"FROM {{db}}.{source}_local" in derived and derived.count("_local") == 1
    with pytest.raises(ClusterSchemaError, match="no FROM"):
        cluster_statements("ALTER TABLE {db}.v_mv MODIFY QUERY SELECT 1", CLUSTER)


def test_every_view_whose_query_changed_is_reloaded_afterwards_on_the_view_itself() -> None:
    """After MODIFY QUERY the server that ran it derives other insert-dedup block ids for the view's
    target than after a restart (0014's header): a later file must DETACH and ATTACH the view."""
    statements = _all_statements()
    for i, statement in enumerate(statements):
        if m := re.match(r"ALTER TABLE (\S+) MODIFY QUERY", statement):
            view = m[1]
            later = statements[i + 1 :]
            detach = later.index(f"DETACH TABLE IF EXISTS {view}")
            assert later[detach + 1] == f"ATTACH TABLE IF NOT EXISTS {view}", view
    for statement in (s for s in statements if re.match(r"(DETACH|ATTACH) TABLE", s)):
        (derived,) = cluster_statements(statement, CLUSTER)
        assert derived == f"{statement} {ON}" and "_local" not in derived
    with pytest.raises(ClusterSchemaError):
        cluster_statements("DETACH TABLE {db}.usage_minute_mv PERMANENTLY", CLUSTER)


def test_bookkeeping_tables_are_one_replica_set_over_the_whole_cluster() -> None:
    for statement in BOOTSTRAP[1:]:
        (derived,) = cluster_statements(statement, CLUSTER, cluster_wide=True)
        assert "'/clickhouse/tables/{database}/{table}', '{shard}-{replica}'" in derived
        assert "_local" not in derived and "Distributed" not in derived


def test_alter_table_goes_to_local_tables_and_to_distributed_ones_for_column_changes() -> None:
    ttl = "ALTER TABLE {db}.usage_events MODIFY TTL timestamp + INTERVAL 30 DAY"
    assert cluster_statements(ttl, CLUSTER) == [
        f"ALTER TABLE {{db}}.usage_events_local {ON} MODIFY TTL timestamp + INTERVAL 30 DAY"
    ]
    add = "ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS region LowCardinality(String)"
    assert cluster_statements(add, CLUSTER) == [
        f"ALTER TABLE {{db}}.usage_events_local {ON} ADD COLUMN IF NOT EXISTS region LowCardinality(String)",
        f"ALTER TABLE {{db}}.usage_events {ON} ADD COLUMN IF NOT EXISTS region LowCardinality(String)",
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE {db}.t (a UInt8) ENGINE = MergeTree ORDER BY a",  # not re-runnable
        "CREATE TABLE IF NOT EXISTS {db}.t (a UInt8) ENGINE = Memory",
        "CREATE TABLE IF NOT EXISTS {db}.t (a UInt8) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY a",
        "CREATE TABLE IF NOT EXISTS spendstream.t (a UInt8) ENGINE = MergeTree ORDER BY a",  # not {db}
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.m TO {db}.t AS SELECT 1",  # no source table
        "INSERT INTO {db}.t VALUES (1)",
        "DROP TABLE {db}.t",
    ],
)
def test_statements_without_a_known_cluster_form_are_refused(statement: str) -> None:
    with pytest.raises(ClusterSchemaError):
        cluster_statements(statement, CLUSTER)


@pytest.mark.parametrize("name", ["", "a b", "x'y", "c;DROP"])
def test_cluster_names_that_could_break_the_ddl_are_refused(name: str) -> None:
    with pytest.raises(ClusterSchemaError):
        cluster_statements("CREATE DATABASE IF NOT EXISTS {db}", name)


def test_split_statements_ignores_semicolons_in_comments_and_quotes() -> None:
    sql = """-- a comment; with a semicolon
CREATE VIEW IF NOT EXISTS {db}.v AS SELECT 'a;b' AS x, `c;d` AS "e;f"; /* block; comment */
SELECT 'it''s; fine', 'back\\'slash;';
-- trailing comment only
"""
    assert split_statements(sql) == [
        "CREATE VIEW IF NOT EXISTS {db}.v AS SELECT 'a;b' AS x, `c;d` AS \"e;f\"",
        "SELECT 'it''s; fine', 'back\\'slash;'",
    ]
    with pytest.raises(MigrationError, match="unterminated"):
        split_statements("SELECT 'open")
