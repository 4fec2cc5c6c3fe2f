"""Tenant isolation: two tenants' rows in one database; tenant B's key must never see tenant A's,
through any analytics endpoint, the export, or analysts' SQL however it is written."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from query_api_stack import (  # pytest puts tests/integration on sys.path
    QueryApiServer,
    insert_events,
    make_events,
    migrate,
)

from spendstream.aggregates import AGGREGATES
from spendstream.clickhouse import get_client
from spendstream.keys import create_key

pytestmark = pytest.mark.clickhouse

UTC = UTC
START, END = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 3, tzinfo=UTC)
#: every tenant-A string (projects, agents, users, event ids) starts with this marker
SECRET = "secretcorp"


@pytest.fixture(scope="module")
def iso(make_settings):
    settings = make_settings(
        bootstrap_admin_key="ss_bootstrap_isolation_" + "k" * 20,
        bootstrap_tenant="ops",
        query_api={"sql_max_seconds": 1.0},
    )
    migrate(settings)
    a = make_events("tenant_a", 400, START, END, seed=11, prefix=SECRET)
    b = make_events("tenant_b", 300, START, END, seed=12, prefix="bee")
    insert_events(settings, a + b)
    client = get_client(settings)
    try:
        _, key_b = create_key(client, "tenant_b", ["read", "admin"], "b")
        # one column, so `x IN db.table` passes analysis and only the query-tree check can refuse it
        client.command(f"CREATE TABLE {settings.clickhouse.database}.tenant_names (tenant String) ENGINE = Memory")
        client.command(f"INSERT INTO {settings.clickhouse.database}.tenant_names VALUES ('{SECRET}')")
    finally:
        client.close()
    with QueryApiServer(settings) as server, server.client(key_b) as b_client:
        yield {"settings": settings, "b": b_client, "a_events": a, "b_events": b}


def leaks(text: str) -> bool:
    return SECRET in text or "tenant_a" in text


ENDPOINTS = [
    ("/v1/analytics/overview", {}),
    ("/v1/analytics/timeseries", {"granularity": "hour"}),
    (
        "/v1/analytics/timeseries",
        {"granularity": "minute", "from": "2024-05-01T10:00:00Z", "to": "2024-05-01T11:00:00Z"},
    ),
    ("/v1/analytics/breakdown", {"by": "project"}),
    ("/v1/analytics/breakdown", {"by": "agent"}),
    ("/v1/analytics/breakdown", {"by": "user"}),
    ("/v1/analytics/breakdown", {"by": "tag:env"}),
    ("/v1/analytics/events", {"limit": 1000}),
    ("/v1/analytics/export", {"format": "csv"}),
    ("/v1/analytics/export", {"format": "json", "data": "breakdown", "by": "project"}),
    ("/v1/analytics/export", {"format": "ndjson"}),
    ("/v1/pricing/unpriced", {}),
    ("/v1/projects", {}),
    ("/v1/keys", {}),
]


@pytest.mark.parametrize("path, params", ENDPOINTS)
def test_endpoints_show_only_the_callers_tenant(iso, path, params):
    r = iso["b"].get(path, params={"from": "2024-05-01", "to": "2024-05-03", **params})
    assert r.status_code == 200, r.text
    assert not leaks(r.text)


def test_asking_for_the_other_tenants_values_finds_nothing(iso):
    a_project = iso["a_events"][0]["project"]
    body = iso["b"].get("/v1/analytics/overview", params={"from": "2024-05-01", "project": a_project}).json()
    assert body["calls"] == 0 and body["cost_nanos"] == 0
    b_total = sum(e["cost_nanos"] for e in iso["b_events"])
    assert (
        iso["b"].get("/v1/analytics/overview", params={"from": "2024-05-01", "to": "2024-05-03"}).json()["cost_nanos"]
        == b_total
    )


def sql(iso, statement: str, fmt: str = "json"):
    return iso["b"].post("/v1/sql", json={"sql": statement, "format": fmt})


def test_sql_sees_only_own_rows_in_every_view(iso):
    r = sql(iso, "SELECT count() AS n, sum(cost_nanos) AS c, uniqExact(tenant) AS t FROM usage_events")
    assert r.status_code == 200, r.text
    n, c, t = r.json()["rows"][0]
    assert (n, c, t) == (len(iso["b_events"]), sum(e["cost_nanos"] for e in iso["b_events"]), 1)
    for view in (a.table for a in AGGREGATES if a.tenant_view):
        r = sql(iso, f"SELECT DISTINCT tenant FROM {view}")
        assert r.status_code == 200 and r.json()["rows"] in ([["tenant_b"]], []), (view, r.text)
    r = sql(iso, "SELECT project, sum(calls) FROM usage_daily GROUP BY project ORDER BY project", fmt="csv")
    assert r.status_code == 200 and r.text.startswith("project,") and not leaks(r.text)


ALLOWED_BUT_CONFINED = [
    # valid SQL that must run and still show only tenant B
    "SELECT * FROM usage_events",
    "WITH t AS (SELECT * FROM usage_events) SELECT tenant, event_id FROM t",
    "SELECT tenant FROM usage_events WHERE tenant = 'tenant_a' OR 1 = 1",
    "SELECT * FROM usage_events AS e WHERE e.tenant != 'tenant_b'",
    "SELECT tenant, count() FROM (SELECT tenant FROM usage_events UNION ALL SELECT tenant FROM usage_daily) GROUP BY tenant",
    "SELECT e.event_id FROM usage_events AS e JOIN usage_hourly AS h ON e.project = h.project LIMIT 10",
    "SELECT (SELECT groupArray(project) FROM usage_minute) AS projects",
    "SELECT arrayJoin([1, 2]) AS x, tenant FROM usage_events LIMIT 4",
    "SELECT getSetting('log_comment') AS me",
    "SELECT number FROM numbers(3)",
    "SELECT * FROM usage_events /* ; SELECT * FROM spendstream.usage_events */",
    "SELECT * FROM usage_events -- ; DROP TABLE usage_events",
]

REFUSED = [
    # (statement, words the refusal message must contain)
    ("SELECT * FROM {db}.usage_events", "not available"),
    ("SELECT * FROM usage_events UNION ALL SELECT * FROM {db}.usage_events", "not available"),
    ("SELECT * FROM usage_events WHERE event_id IN (SELECT event_id FROM {db}.usage_events)", "not available"),
    ("SELECT (SELECT groupArray(event_id) FROM {db}.usage_events)", "not available"),
    ("SELECT tenant FROM usage_events WHERE tenant IN {db}.api_keys", "refused"),
    ("SELECT tenant FROM usage_events WHERE tenant NOT IN {db}.tenant_names", "only the tenant views"),
    ("SELECT count() FROM usage_events WHERE 'x' IN {db}.tenant_names", "only the tenant views"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "table function file()"),
    ("SELECT file('/etc/passwd')", "function file()"),
    ("SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')", "table function url()"),
    ("SELECT * FROM remote('127.0.0.1', {db}.usage_events)", "table function remote()"),
    ("SELECT * FROM cluster('default', {db}.usage_events)", "table function cluster()"),
    ("SELECT * FROM merge('{db}', 'usage_.*')", "table function merge()"),
    ("SELECT * FROM view(SELECT * FROM {db}.usage_events)", "table function view()"),
    ("SELECT * FROM system.tables", "not available"),
    ("SELECT name FROM system.databases", "not available"),
    ("SELECT * FROM usage_events SETTINGS log_comment = 'tenant_a'", "SETTINGS"),
    ("SELECT * FROM (SELECT * FROM usage_events SETTINGS log_comment = 'tenant_a')", "SETTINGS"),
    ("SELECT 1; SELECT * FROM {db}.usage_events", "Multi-statements"),
    ("SELECT 1; SET log_comment = 'tenant_a'", "Multi-statements"),
    ("SET log_comment = 'tenant_a'", "only SELECT"),
    ("INSERT INTO usage_events (tenant, event_id) VALUES ('tenant_a', 'x')", "only SELECT"),
    ("ALTER TABLE usage_events DELETE WHERE 1", "only SELECT"),
    ("DROP TABLE usage_events", "only SELECT"),
    ("TRUNCATE TABLE usage_events", "only SELECT"),
    ("CREATE TABLE t (a Int8) ENGINE = Memory", "only SELECT"),
    ("SHOW TABLES FROM {db}", "only SELECT"),
    ("DESCRIBE TABLE {db}.usage_events", "only SELECT"),
    ("SELECT dictGet('{db}.some_dict', 'tenant', 1)", "function dictGet()"),
    ("SELECT arrayJoin(dictGetAll('{db}.some_dict', 'tenant', 1))", "function dictGetAll()"),
    ("SELECT joinGet('{db}.usage_events', 'tenant', 'x')", "function joinGet()"),
    ("SELECT * FROM current_tenant", "only the tenant views"),
    ("SELECT * FROM {db}_tenant.current_tenant", "not available"),
    ("SELECT tenant FROM usage_events FORMAT JSON", "FORMAT"),
    ("SELECT tenant FROM usage_events INTO OUTFILE '/tmp/leak.csv'", "INTO OUTFILE"),
    ("SELECT * FROM input('a String')", "table function input()"),
    ("SELECT * FROM dictionary('{db}.some_dict')", "table function dictionary()"),
    ("EXPLAIN SELECT * FROM {db}.usage_events", "only SELECT"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k.csv')", "table function s3()"),
]


@pytest.mark.parametrize("statement", ALLOWED_BUT_CONFINED)
def test_confined_sql_runs_but_shows_only_own_rows(iso, statement):
    r = sql(iso, statement)
    assert r.status_code == 200, r.text
    assert not leaks(json.dumps(r.json()["rows"]))


@pytest.mark.parametrize("statement, reason", REFUSED)
def test_adversarial_sql_is_refused_with_a_clear_message(iso, statement, reason):
    db = iso["settings"].clickhouse.database
    r = sql(iso, statement.format(db=db))
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["error"] == "query_refused" and body["field"] == "sql"
    assert reason.lower() in body["message"].lower(), body["message"]
    assert SECRET not in r.text  # the message may quote the statement, never tenant A's data


def test_there_are_at_least_twenty_adversarial_statements():
    assert len(REFUSED) + len(ALLOWED_BUT_CONFINED) >= 20 and len(REFUSED) >= 20


def test_row_limit_truncates_and_says_so(iso):
    r = iso["b"].post("/v1/sql", json={"sql": "SELECT number FROM numbers(1000)", "max_rows": 10})
    body = r.json()
    assert body["row_count"] == 10 and body["truncated"] is True
    assert r.headers["x-spendstream-truncated"] == "true"
    r = iso["b"].post("/v1/sql", json={"sql": "SELECT number FROM numbers(5)", "max_rows": 10})
    assert r.json()["truncated"] is False


def test_unknown_columns_fail_with_clickhouse_message(iso):
    r = sql(iso, "SELECT no_such_column FROM usage_events")
    assert r.status_code == 400 and "no_such_column" in r.json()["message"]


def test_time_limit_stops_a_long_statement(iso):
    started = time.monotonic()
    # 5e9 rows: under the rows-to-read limit (1e10), which refuses bigger scans before they start
    r = sql(iso, "SELECT sum(cityHash64(number)) FROM numbers(5000000000)")
    assert r.status_code == 400 and r.json()["error"] == "query_failed"
    assert "time limit" in r.json()["message"]
    assert time.monotonic() - started < 10
