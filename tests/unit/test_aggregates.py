"""The registry of aggregate tables, on its own (tests/integration/test_aggregates_registry.py holds
it against the migrated schema)."""

from __future__ import annotations

import re
from pathlib import Path

from query_api.sqlguard import TENANT_VIEWS as GUARDED_VIEWS
from query_api.usage_sql import AGGREGATES as PLANNED
from query_api.usage_sql import MEASURES
from spendstream.aggregates import (
    AGGREGATES,
    NON_AGGREGATE_TENANT_VIEWS,
    SUMMED_USAGE_MEASURES,
    TENANT_VIEWS,
    USAGE_MEASURES,
    draft_migration,
)  # fmt: skip
from spendstream.migrate import split_statements

CLICKHOUSE_README = Path(__file__).resolve().parents[2] / "clickhouse" / "README.md"


def test_names_are_unique_and_every_key_and_projection_fits_its_table() -> None:
    tables = [a.table for a in AGGREGATES]
    assert len(set(tables)) == len(tables)
    assert not set(tables) & set(NON_AGGREGATE_TENANT_VIEWS)
    for a in AGGREGATES:
        names = [name for name, _ in a.columns]
        assert len(set(names)) == len(names), a.table
        assert a.key, a.table
        for p in a.projections:
            assert set(p.dimensions) < set(a.key), (a.table, p.name)
            summed = {m.name for m in a.measures if m.merge == "sum"}
            assert set(p.measures) <= summed, (a.table, p.name)


def test_secret_tables_have_no_tenant_view_and_the_guard_reads_the_registry() -> None:
    assert not {"api_keys", "webhooks"} & TENANT_VIEWS
    assert GUARDED_VIEWS == TENANT_VIEWS


def test_the_planner_reads_every_time_bucketed_usage_aggregate() -> None:
    usage = {a.table for a in AGGREGATES if a.grain is not None and a.measure_names >= set(SUMMED_USAGE_MEASURES)}
    assert {s.table for s in PLANNED} == usage
    assert list(MEASURES) == list(SUMMED_USAGE_MEASURES)
    assert [m.name for m in USAGE_MEASURES if m.name not in MEASURES] == ["users", "sessions"]


def test_clickhouse_readme_documents_every_aggregate_and_tenant_view() -> None:
    text = CLICKHOUSE_README.read_text()
    for a in AGGREGATES:
        assert f"`{a.table}`" in text, a.table
        assert f"`{', '.join(a.key)}`" in text, f"{a.table}: its key columns are not listed in {CLICKHOUSE_README.name}"
    views = re.search(r"^## Tenant-scoped views.*?(?=^## )", text, re.DOTALL | re.MULTILINE)[0]
    for view in TENANT_VIEWS:
        assert f"`{view}`" in views, view


def test_a_draft_is_a_table_its_view_and_its_tenant_view() -> None:
    for a in AGGREGATES:
        statements = split_statements(draft_migration(a))
        assert statements[0].startswith(f"CREATE TABLE IF NOT EXISTS {{db}}.{a.table}\n")
        assert statements[1].startswith(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{a.mv} TO {{db}}.{a.table} AS")
        tenant_view = [f"CREATE VIEW IF NOT EXISTS {{db}}_tenant.{a.table} AS"] if a.tenant_view else []
        assert [s.split("\n", 1)[0] for s in statements[2:]] == tenant_view
