"""The `without_user` projections (migration 0008): analytics that need no user read them, queries on
users read the table, and the figures equal the raw rows before and after SummingMergeTree merges
parts (which rebuilds the projections)."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from query_api_stack import QueryApiServer, insert_events, make_events, migrate

from query_api.filters import Filters
from query_api.usage_sql import GroupBy, UsageQuery, build_usage_query
from spendstream.aggregates import AGGREGATES
from spendstream.clickhouse import get_client

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "j" * 24
TENANT = "proj_tenant"
START = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 3, 9, 13, 20, tzinfo=UTC)  # whole days, then hours, then minutes


@pytest.fixture(scope="module")
def stack(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    # two inserts: two parts per partition for the merge below
    events = make_events(TENANT, 600, START, END, seed=11) + make_events(TENANT, 600, START, END, seed=12, prefix="p2")
    insert_events(settings, events[:600])
    insert_events(settings, events[600:])
    insert_events(settings, make_events("someone_else", 200, START, END, seed=13))
    client = get_client(settings)
    try:
        with QueryApiServer(settings) as server, server.client(ADMIN_KEY) as api:
            yield {"client": client, "api": api, "events": events}
    finally:
        client.close()


def planned_reads(client, q: UsageQuery) -> list[str]:
    built = build_usage_query(q, TENANT)
    plan = client.query("EXPLAIN projections = 1 " + built.sql, parameters=built.params).result_rows
    return [m[1].rsplit(".", 1)[-1] for (line,) in plan if (m := re.search(r"ReadFromMergeTree \((.*)\)", line))]


def test_queries_without_user_read_the_projections(stack):
    filters = Filters(start=START, end=END, tz=ZoneInfo("UTC"))
    # daily, hourly, minute (which has no user key and no projection)
    assert planned_reads(stack["client"], UsageQuery(filters)) == ["without_user", "without_user", "usage_minute"]
    assert (
        planned_reads(stack["client"], UsageQuery(filters, group=GroupBy(dimension="agent")))[:2]
        == ["without_user"] * 2
    )
    by_user = planned_reads(stack["client"], UsageQuery(filters, group=GroupBy(dimension="user")))
    assert "without_user" not in by_user


def by_agent(events) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in events:
        totals[e["agent"]][0] += 1
        totals[e["agent"]][1] += e["cost_nanos"]
    return {k: tuple(v) for k, v in totals.items()}


def observed(api) -> tuple[tuple[int, int], dict[str, tuple[int, int]], int]:
    window = {"from": START.isoformat(), "to": END.isoformat()}
    overview = api.get("/v1/analytics/overview", params=window).json()
    groups = api.get("/v1/analytics/breakdown", params=window | {"by": "agent"}).json()["groups"]
    series = api.get("/v1/analytics/timeseries", params=window | {"granularity": "day"}).json()["points"]
    return (
        (overview["calls"], int(Decimal(overview["cost_usd"]) * 10**9)),
        {g["key"]: (g["calls"], int(Decimal(g["cost_usd"]) * 10**9)) for g in groups},
        sum(p["calls"] for p in series),
    )


def test_figures_equal_the_raw_rows_before_and_after_merges(stack):
    events, api, client = stack["events"], stack["api"], stack["client"]
    want = ((len(events), sum(e["cost_nanos"] for e in events)), by_agent(events), len(events))
    assert observed(api) == want
    with_projections = [a.table for a in AGGREGATES if a.projections]
    assert with_projections
    for table in with_projections:
        client.command(f"OPTIMIZE TABLE {table} FINAL")
    parts = client.query(
        "SELECT table, partition, count() FROM system.parts WHERE database = currentDatabase() AND active "
        "AND has({tables:Array(String)}, table) GROUP BY table, partition HAVING count() > 1",
        parameters={"tables": with_projections},
    ).result_rows
    assert parts == [], "OPTIMIZE FINAL leaves one part per partition"
    assert observed(api) == want
