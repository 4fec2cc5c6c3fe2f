"""The SQL that deploy/ ships runs on the real schema, and answers right.

- every ClickHouse query of the Grafana dashboard (panels and template variable), with the
  plugin's macros expanded as grafana-clickhouse-datasource expands them, runs against the
  migrated schema on the embedded ClickHouse; figures are checked against the seeded events;
- the compose ClickHouse users file names real tables, and its row-policy filters and grants
  are valid SQL on them;
- every SQL block of deploy/README.md parses in ClickHouse.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendstream.clickhouse import get_client
from spendstream.migrate import apply_migrations
from spendstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.clickhouse

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "spendstream.json"
USERS_XML = REPO_ROOT / "deploy" / "compose" / "clickhouse" / "users.d" / "spendstream.xml"
README = REPO_ROOT / "deploy" / "README.md"
CLICKHOUSE_DATASOURCE = "grafana-clickhouse-datasource"
#: the database the deploy files name; the test's own database replaces it
DEPLOY_DATABASE = "spendstream"

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
#: the dashboard's default range (now-6h .. now) around the seeded events
RANGE = (NOW - timedelta(hours=6), NOW + timedelta(minutes=1))


# ---- Grafana macro expansion -----------------------------------------------------------------


def _split_call(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Top-level comma-separated arguments of the call whose '(' is at ``open_paren``, and the
    index after its ')'."""
    depth, args, start = 0, [], open_paren + 1
    for i in range(open_paren, len(sql)):
        if sql[i] == "(":
            depth += 1
        elif sql[i] == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i].strip())
                return args, i + 1
        elif sql[i] == "," and depth == 1:
            args.append(sql[start:i].strip())
            start = i + 1
    raise ValueError(f"unbalanced parentheses in {sql!r}")


def expand_grafana(sql: str, start: datetime, end: datetime, interval_s: int, tenants: list[str] | None) -> str:
    """The query as ClickHouse receives it from Grafana, for ``tenants`` (None = "All").

    Order as in Grafana: the plugin's ``$__conditionalAll`` (decided on the raw variable), then
    template variables, then the plugin's time macros (reference: the plugin's macro table).
    """
    while (at := sql.find("$__conditionalAll(")) >= 0:
        (condition, variable), after = _split_call(sql, at + len("$__conditionalAll"))
        assert variable == "$tenant", variable
        sql = sql[:at] + ("1=1" if tenants is None else condition) + sql[after:]
    quoted = ",".join(f"'{t}'" for t in (tenants or ["__all__"]))
    sql = sql.replace("${tenant:singlequote}", quoted)

    s, e = int(start.timestamp()), int(end.timestamp())
    s_ms, e_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    with_column: dict[str, Callable[[str], str]] = {
        "timeFilter": lambda c: f"{c} >= toDateTime({s}) AND {c} <= toDateTime({e})",
        "timeFilter_ms": lambda c: (
            f"{c} >= fromUnixTimestamp64Milli({s_ms}) AND {c} <= fromUnixTimestamp64Milli({e_ms})"
        ),
        "dateFilter": lambda c: f"{c} >= toDate('{start.date()}') AND {c} <= toDate('{end.date()}')",
        "timeInterval": lambda c: f"toStartOfInterval(toDateTime({c}), INTERVAL {interval_s} second)",
        "timeInterval_ms": lambda c: (
            f"toStartOfInterval(toDateTime64({c}, 3), INTERVAL {interval_s * 1000} millisecond)"
        ),
    }
    plain = {
        "fromTime": f"toDateTime({s})",
        "toTime": f"toDateTime({e})",
        "fromTime_ms": f"fromUnixTimestamp64Milli({s_ms})",
        "toTime_ms": f"fromUnixTimestamp64Milli({e_ms})",
        "interval_s": str(interval_s),
    }
    while (m := re.search(r"\$__(\w+)", sql)) is not None:
        name = m.group(1)
        if name in with_column:
            (column,), after = _split_call(sql, m.end())
            sql = sql[: m.start()] + with_column[name](column) + sql[after:]
        elif name in plain:
            sql = sql[: m.start()] + plain[name] + sql[m.end() :]
        else:
            raise AssertionError(f"macro $__{name} is not one the ClickHouse plugin expands")
    assert "$" not in sql, f"unexpanded variable in {sql!r}"
    return sql


def test_expansion_matches_the_plugin_reference() -> None:
    start = datetime.fromtimestamp(1415792726, UTC)
    end = datetime.fromtimestamp(1447328726, UTC)
    assert expand_grafana("WHERE $__timeFilter(ts)", start, end, 20, None) == (
        "WHERE ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726)"
    )
    assert expand_grafana("$__timeInterval(ts)", start, end, 20, None) == (
        "toStartOfInterval(toDateTime(ts), INTERVAL 20 second)"
    )
    conditional = "$__conditionalAll(tenant IN (${tenant:singlequote}), $tenant)"
    assert expand_grafana(conditional, start, end, 20, None) == "1=1"
    assert expand_grafana(conditional, start, end, 20, ["a", "b"]) == "tenant IN ('a','b')"
    with pytest.raises(AssertionError, match="not one the ClickHouse plugin expands"):
        expand_grafana("$__timeGroup(ts)", start, end, 20, None)


# ---- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def clickhouse_queries() -> dict[str, str]:
    """Title -> SQL of every ClickHouse query: panel targets and query variables."""
    board = dashboard()
    queries = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if target["datasource"]["type"] == CLICKHOUSE_DATASOURCE:
                queries[f"{panel['title']} [{target['refId']}]"] = target["rawSql"]
    for variable in board["templating"]["list"]:
        if variable["datasource"]["type"] == CLICKHOUSE_DATASOURCE:
            queries[f"variable {variable['name']}"] = variable["query"]
    return queries


def in_database(sql: str, database: str) -> str:
    return re.sub(rf"\b{DEPLOY_DATABASE}\.", f"{database}.", sql)


# ---- seeded data -----------------------------------------------------------------------------

EVENT_COLUMNS = [
    "tenant",
    "project",
    "agent",
    "user",
    "session_id",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_nanos",
    "cost_input_nanos",
    "cost_output_nanos",
    "pricing_status",
    "price_source",
    "status",
    "latency_ms",
    "event_id",
    "timestamp",
    "received_at",
    "tags",
]


def seeded_events() -> list[dict[str, Any]]:
    events = []
    for i in range(60):
        tenant = "acme" if i % 3 else "globex"
        model = ("gpt-4o", "claude-sonnet-4", "mystery-model")[i % 3 if i % 10 else 2]
        unpriced = model == "mystery-model"
        cost = 0 if unpriced else 1_000_003 * (i + 1)  # odd nano amounts: exactness shows
        at = NOW - timedelta(minutes=3 * i + 1)
        events.append(
            {
                "tenant": tenant,
                "project": f"p{i % 2}",
                "agent": f"agent-{i % 4}",
                "user": f"u{i % 5}",
                "session_id": f"s{i % 7}",
                "provider": "anthropic" if "claude" in model else "openai",
                "model": model,
                "input_tokens": 100 + i,
                "output_tokens": 10 + i,
                "cost_nanos": cost,
                "cost_input_nanos": cost - cost // 3,
                "cost_output_nanos": cost // 3,
                "pricing_status": "unknown_model" if unpriced else "priced",
                "price_source": "none" if unpriced else "catalog",
                "status": "error" if i % 7 == 0 else "ok",
                "latency_ms": None if i % 5 == 0 else 200 + i,
                "event_id": f"evt-{i}",
                "timestamp": at,
                "received_at": at + timedelta(seconds=1),
                "tags": {"team": f"t{i % 2}"},
            }
        )
    return events


EVENTS = seeded_events()


def usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


@pytest.fixture(scope="module")
def migrated(make_settings: Callable[..., Settings]) -> Iterator[tuple[Any, str]]:
    settings = make_settings()
    database = settings.clickhouse.database
    client = get_client(settings, database="system")
    apply_migrations(client, settings, echo=lambda _line: None)
    client.insert(
        f"{database}.usage_events",
        [[e[c] for c in EVENT_COLUMNS] for e in EVENTS],
        column_names=EVENT_COLUMNS,
    )
    client.insert(
        f"{database}.budget_alerts",
        [
            [
                "acme",
                "alert-1",
                "threshold",
                "b1",
                "monthly llm",
                NOW - timedelta(days=1),
                Decimal("80"),
                8_000_000_000,
                10_000_000_000,
                Decimal("80.0000"),
                NOW - timedelta(minutes=5),
            ]
        ],
        column_names=[
            "tenant",
            "alert_id",
            "kind",
            "budget_id",
            "budget_name",
            "window_start",
            "threshold",
            "spent_nanos",
            "limit_nanos",
            "percent_used",
            "fired_at",
        ],
    )
    yield client, database
    client.close()


def run_panel(migrated: tuple[Any, str], title: str, tenants: list[str] | None) -> list[tuple]:
    client, database = migrated
    sql = expand_grafana(in_database(clickhouse_queries()[title], database), *RANGE, 60, tenants)
    return client.query(sql).result_rows


@pytest.mark.parametrize("tenants", [None, ["acme"]], ids=["all-tenants", "one-tenant"])
def test_every_dashboard_query_runs_and_finds_the_seeded_data(migrated, tenants) -> None:
    queries = clickhouse_queries()
    assert len(queries) >= 10
    for title in queries:
        rows = run_panel(migrated, title, tenants)
        assert rows, f"{title}: no rows over seeded data"


def selected(tenants: list[str] | None) -> list[dict[str, Any]]:
    return [e for e in EVENTS if tenants is None or e["tenant"] in tenants]


@pytest.mark.parametrize("tenants", [None, ["acme"], ["globex"]], ids=["all", "acme", "globex"])
def test_dashboard_figures_equal_the_events(migrated, tenants) -> None:
    events = selected(tenants)
    total_nanos = sum(e["cost_nanos"] for e in events)

    [(spend,)] = run_panel(migrated, "Spend [A]", tenants)
    assert spend == usd(total_nanos), "exact decimal, not a float sum"
    assert run_panel(migrated, "Calls [A]", tenants) == [(len(events),)]
    assert run_panel(migrated, "Unpriced events [A]", tenants) == [
        (sum(e["pricing_status"] == "unknown_model" for e in events),)
    ]
    [(error_rate,)] = run_panel(migrated, "Error rate [A]", tenants)
    assert error_rate == pytest.approx(sum(e["status"] == "error" for e in events) / len(events))
    latencies = [e["latency_ms"] for e in events if e["latency_ms"] is not None]
    [(avg_latency,)] = run_panel(migrated, "Avg latency [A]", tenants)
    assert avg_latency == pytest.approx(sum(latencies) / len(latencies))
    [(seconds_ago,)] = run_panel(migrated, "Newest event stored [A]", tenants)
    newest = max(e["received_at"] for e in events)
    assert seconds_ago == pytest.approx((datetime.now(UTC) - newest).total_seconds(), abs=30)

    by_model: dict[str, Decimal] = {}
    for _time, model, spend_usd in run_panel(migrated, "Spend by model [A]", tenants):
        by_model[model] = by_model.get(model, Decimal(0)) + spend_usd
    expected_by_model: dict[str, Decimal] = {}
    for e in events:
        expected_by_model[e["model"]] = expected_by_model.get(e["model"], Decimal(0)) + usd(e["cost_nanos"])
    assert by_model == expected_by_model

    calls_series = run_panel(migrated, "Calls and errors [A]", tenants)
    assert sum(row[1] for row in calls_series) == len(events)
    assert sum(row[2] for row in calls_series) == sum(e["status"] == "error" for e in events)


def test_breakdown_tables_equal_the_events(migrated) -> None:
    expected: dict[str, Decimal] = {}
    for e in EVENTS:
        expected[e["tenant"]] = expected.get(e["tenant"], Decimal(0)) + usd(e["cost_nanos"])
    rows = run_panel(migrated, "Spend by tenant [A]", None)
    assert {tenant: spend for tenant, spend, *_ in rows} == expected
    assert [spend for _, spend, *_ in rows] == sorted(expected.values(), reverse=True)

    agents = run_panel(migrated, "Top agents [A]", ["acme"])
    assert sum(calls for _agent, _spend, calls, _errors in agents) == len(selected(["acme"]))

    expected_unpriced: dict[tuple[str, str, str], int] = {}
    for e in EVENTS:
        if e["pricing_status"] == "unknown_model":
            key = (e["tenant"], e["provider"], e["model"])
            expected_unpriced[key] = expected_unpriced.get(key, 0) + 1
    rows = run_panel(migrated, "Unpriced models [A]", None)
    assert {row[:3]: row[3] for row in rows} == expected_unpriced

    [alert] = run_panel(migrated, "Recent budget alerts [A]", ["acme"])
    assert alert[1:4] == ("acme", "monthly llm", "threshold")
    assert alert[-2:] == (Decimal("8"), Decimal("10"))
    assert run_panel(migrated, "Recent budget alerts [A]", ["globex"]) == []


def test_tenant_variable_lists_the_tenants(migrated) -> None:
    assert run_panel(migrated, "variable tenant", None) == [("acme",), ("globex",)]


# ---- ClickHouse users of the compose stack ---------------------------------------------------


def user_policies() -> dict[str, dict[str, str]]:
    """user -> {table: row filter} from users.d/spendstream.xml (database `spendstream` only)."""
    root = ET.parse(USERS_XML).getroot()
    policies = {}
    for user in root.find("users"):
        tables = user.find(f"databases/{DEPLOY_DATABASE}")
        policies[user.tag] = {t.tag: t.findtext("filter") for t in (tables if tables is not None else [])}
    return policies


def user_grants() -> dict[str, list[str]]:
    root = ET.parse(USERS_XML).getroot()
    return {user.tag: [q.text for q in user.findall("grants/query")] for user in root.find("users")}


def test_row_policy_filters_run_on_the_tables_and_confine_the_analyst(migrated) -> None:
    client, database = migrated
    policies = user_policies()
    for user, tables in policies.items():
        for table, condition in tables.items():
            seen = client.query(f"SELECT DISTINCT tenant FROM {database}.{table} WHERE {condition} ORDER BY tenant")
            expected = [("acme",)] if user == "analyst_acme" else [("acme",), ("globex",)]
            assert seen.result_rows == expected, (user, table)
    # fail-closed server setting: a user granted a policied table without a filter reads nothing
    policied = set().union(*policies.values())
    for user, grants in user_grants().items():
        for grant in grants:
            database_name, table = re.search(r" ON (\w+)\.(\w+|\*)", grant).groups()
            if database_name != DEPLOY_DATABASE:
                continue
            readable = policied if table == "*" else {table} & policied
            assert readable <= set(policies[user]), f"{user} would read nothing from {readable - set(policies[user])}"


def test_user_grants_name_real_tables_and_parse(migrated) -> None:
    client, database = migrated
    tables = {
        name
        for (name,) in client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": database}
        ).result_rows
    }
    databases = {DEPLOY_DATABASE, f"{DEPLOY_DATABASE}_tenant"}
    for user, grants in user_grants().items():
        for grant in grants:
            target = re.search(r" ON (\w+)\.(\w+|\*)", grant)
            assert target.group(1) in databases, grant
            if target.group(1) == DEPLOY_DATABASE and target.group(2) != "*":
                assert target.group(2) in tables, f"{user}: {grant} names no table of the schema"
            # users.xml grants name no grantee (the server parses them for the enclosing user)
            statement = f"{grant} TO {user}"
            formatted = client.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows
            assert formatted[0][0].startswith("GRANT"), grant
    for user, tables_with_policy in user_policies().items():
        assert set(tables_with_policy) <= tables, user


def test_readme_sql_parses(migrated) -> None:
    client, _ = migrated
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)
    statements = [s.strip() for block in blocks for s in block.split(";") if s.strip()]
    assert len(statements) >= 5
    for statement in statements:
        client.query("SELECT formatQuery({q:String})", parameters={"q": statement})
