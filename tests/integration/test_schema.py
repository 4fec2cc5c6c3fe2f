"""The ClickHouse schema and its migrator, on the session's (embedded) ClickHouse over HTTP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from spendstream.aggregates import AGGREGATES, TENANT_VIEWS
from spendstream.clickhouse import get_async_client, get_client
from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS
from spendstream.migrate import BOOTSTRAP, SCHEMA_DIR, MigrationError, apply_migrations, load_migrations, render
from spendstream.schema_cluster import cluster_statements
from spendstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.clickhouse

SNAPSHOT = REPO_ROOT / "tests" / "fixtures" / "clickhouse_schema_snapshot.sql"
SECRET_TABLES = {"api_keys", "webhooks"}  # no tenant view: they hold secrets or their hashes
# people and login (0011): password and token hashes, other organisations' login attempts
SECRET_TABLES |= {"orgs", "users", "org_members", "invites", "auth_sessions", "refresh_tokens",
                  "session_revocations", "audit_log", "api_key_owners"}  # fmt: skip
SECRET_TABLES |= {"provider_keys", "provider_connections"}  # proxy (0010), collectors (0016): sealed keys
PUBLIC_TABLES = {
    "usage_events", "projects", "budgets", "price_overrides", "budget_alerts", "alert_deliveries",
    "anomaly_settings", "provider_usage_hourly", "provider_costs_daily", *SECRET_TABLES, *(a.table for a in AGGREGATES),
}  # fmt: skip
COST_COLUMNS = ["cost_nanos"] + [f"cost_{c}_nanos" for c in COST_CLASSES]
# measure name -> how usage_events computes it (stated here independently of the registry and the
# schema files); every aggregate must agree after reading its rows with the measure's merge function
MEASURES: dict[str, str] = {
    "calls": "count()",
    "errors": "countIf(status = 'error')",
    "unpriced": "countIf(pricing_status IN ('unknown_model', 'cost_over_cap'))",
    **{t: f"sum({t})" for t in TOKEN_FIELDS},
    **{c: f"sum(toInt128({c}))" for c in COST_COLUMNS},
    "latency_ms_sum": "ifNull(sum(latency_ms), 0)",
    "latency_count": "count(latency_ms)",
    "users": "uniqExactIf(user, user != '')",
    "sessions": "uniqExactIf(session_id, session_id != '')",
    # unpriced_models
    "events": "count()",
    "first_seen": "min(timestamp)",
    "last_seen": "max(timestamp)",
    # ingest_progress
    "max_src_offset": "max(src_offset)",
}
DEDUP = {"deduplicate_blocks_in_dependent_materialized_views": 1}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator:
    c = get_client(settings, database="system")
    yield c
    c.close()


@pytest.fixture(scope="module")
def migrated(client, settings: Settings) -> Iterator[str]:
    """The module's database, migrated from zero once."""
    applied = apply_migrations(client, settings, echo=quiet)
    assert applied == [m.name for m in load_migrations()]
    yield settings.clickhouse.database
    _drop(client, settings)


def _drop(client, settings: Settings) -> None:
    for database in (settings.clickhouse.database, f"{settings.clickhouse.database}_tenant"):
        client.command(f"DROP DATABASE IF EXISTS {database}")


def _tables(client, database: str) -> dict[str, str]:
    rows = client.query(
        "SELECT name, engine FROM system.tables WHERE database = {db:String}", parameters={"db": database}
    ).result_rows
    return dict(rows)


def test_migrate_from_zero_creates_the_public_tables_and_records_each_file(client, migrated: str) -> None:
    tables = _tables(client, migrated)
    assert PUBLIC_TABLES <= set(tables)
    for aggregate in AGGREGATES:
        assert tables[aggregate.mv] == "MaterializedView"
    recorded = dict(client.query(f"SELECT name, checksum FROM {migrated}.schema_migrations").result_rows)
    assert recorded == {m.name: m.checksum for m in load_migrations()}
    views = _tables(client, f"{migrated}_tenant")
    assert set(views) == TENANT_VIEWS | {"current_tenant"}
    assert PUBLIC_TABLES - TENANT_VIEWS == SECRET_TABLES | {a.table for a in AGGREGATES if not a.tenant_view}
    assert set(views.values()) == {"View"}


def test_every_raw_and_mv_target_table_has_a_deduplication_window(client, migrated: str) -> None:
    targets = ["usage_events", *(a.table for a in AGGREGATES)]
    rows = client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND has({names:Array(String)}, name)",
        parameters={"db": migrated, "names": targets},
    ).result_rows
    assert len(rows) == len(targets)
    for name, engine in rows:
        assert "non_replicated_deduplication_window = 1000" in engine, name


def test_rerun_is_a_no_op(client, settings: Settings, migrated: str) -> None:
    before = _tables(client, migrated)
    lines: list[str] = []
    assert apply_migrations(client, settings, echo=lines.append) == []
    assert lines == [f"{migrated}: up to date ({len(load_migrations())} files applied)"]
    assert _tables(client, migrated) == before
    assert client.query(f"SELECT count() FROM {migrated}.schema_migrations").result_rows[0][0] == len(load_migrations())


def test_ddl_matches_the_committed_snapshot(client, migrated: str) -> None:
    """SHOW CREATE of every table and view, with the database name replaced by {db}.

    After a deliberate schema change (a new file), regenerate the snapshot with
    ``SPENDSTREAM_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/integration/test_schema.py -k snapshot``
    and review its diff.
    """
    parts = []
    for database in (migrated, f"{migrated}_tenant"):
        for name in sorted(_tables(client, database)):
            ddl = client.query(f"SHOW CREATE TABLE {database}.`{name}`").result_rows[0][0]
            parts.append(ddl.replace(migrated, "{db}") + ";\n")
    actual = "\n".join(parts)
    if os.environ.get("SPENDSTREAM_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(actual)
    assert actual == SNAPSHOT.read_text(), f"schema differs from {SNAPSHOT.name}; see this test's docstring"


def test_every_mv_select_matches_its_target_columns_in_order(client, migrated: str) -> None:
    mvs = client.query(
        "SELECT name, create_table_query, as_select FROM system.tables "
        "WHERE database = {db:String} AND engine = 'MaterializedView'",
        parameters={"db": migrated},
    ).result_rows
    # the aggregates' views and the sink's way in (usage_events_in -> usage_events)
    assert {name for name, _, _ in mvs} == {a.mv for a in AGGREGATES} | {"usage_events_in_mv"}
    for name, create, select in mvs:
        target = re.search(rf"\bTO {migrated}\.(\w+)", create)[1]
        selected = [row[0] for row in client.query(f"DESCRIBE ({select})").result_rows]
        columns = [
            row[0]
            for row in client.query(
                "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
                parameters={"db": migrated, "t": target},
            ).result_rows
        ]
        assert selected == columns, f"{name} -> {target}"


async def test_async_client_defaults_to_the_configured_database(settings: Settings, migrated: str) -> None:
    client = await get_async_client(settings)
    try:
        assert (await client.query("SELECT currentDatabase()")).result_rows == [(migrated,)]
    finally:
        await client.close()


# --- data through the raw table and every MV ------------------------------------------------------


def _usage_rows(tenant: str, n: int, start: datetime, src_offset: int) -> list[dict]:
    """n varied events: tags or none, unknown models, errors, missing latency, a month boundary."""
    rows = []
    for i in range(n):
        unknown = i % 7 == 0
        over_cap = i % 13 == 0 and not unknown  # stored at cost 0 too, with the price that was refused
        tokens = {t: (i * 13 + k * 7) % 500 for k, t in enumerate(TOKEN_FIELDS)}
        costs = {c: 0 if unknown or over_cap else (i * 1_000_003 + k * 17) % 9_000_000
                 for k, c in enumerate(COST_COLUMNS[1:])}  # fmt: skip
        rows.append(
            {
                "tenant": tenant,
                "project": f"p{i % 3}",
                "agent": f"agent-{i % 4}",
                "user": "" if i % 5 == 0 else f"u{i % 6}",
                "session_id": f"s{i % 9}",
                "operation": "chat",
                "tags": {} if i % 4 == 0 else {"team": f"t{i % 2}", "env": "prod"},
                "provider": "openai" if i % 2 else "anthropic",
                "model": "mystery-model" if unknown else f"model-{i % 3}",
                **tokens,
                "cost_nanos": sum(costs.values()),
                **costs,
                "price_id": "" if unknown else "catalog:x",
                "pricing_status": "unknown_model" if unknown else "cost_over_cap" if over_cap else "priced",
                "price_source": "none" if unknown else "catalog",
                "status": "error" if i % 11 == 0 else "ok",
                "latency_ms": None if i % 3 == 0 else 100 + i,
                "event_id": f"{tenant}-{src_offset}-{i}",
                "timestamp": start + timedelta(seconds=37 * i),
                "received_at": start + timedelta(seconds=37 * i + 1),
                "partition": 0,
                "offset": src_offset,
                "src_partition": i % 2,
                "src_offset": src_offset + i % 2,
            }
        )
    return rows


def _insert(client, database: str, rows: list[dict], token: str) -> None:
    columns = list(rows[0])
    client.insert(
        f"{database}.usage_events",
        [[r[c] for c in columns] for r in rows],
        column_names=columns,
        settings={**DEDUP, "insert_deduplication_token": token},
    )


def _aggregate_vs_raw(client, database: str) -> dict[str, tuple[list, list]]:
    """For every aggregate of the registry: (rows read from it per key, the same figures computed
    from usage_events with MEASURES, over the events and buckets the registry says it keeps)."""
    out = {}
    for a in AGGREGATES:
        keys = ", ".join(a.key)
        source = f"{database}.usage_events"
        if a.array_join:
            source += f" ARRAY JOIN {a.array_join}"
        if a.where:
            source += f" WHERE {a.where}"
        out[a.table] = (
            client.query(
                f"SELECT {keys}, {', '.join(m.read for m in a.measures)} FROM {database}.{a.table} "
                f"GROUP BY {keys} ORDER BY {keys}"
            ).result_rows,
            client.query(
                f"SELECT {', '.join(d.select for d in a.dimensions)}, {', '.join(MEASURES[m.name] for m in a.measures)} "
                f"FROM {source} GROUP BY {keys} ORDER BY {keys}"
            ).result_rows,
        )
    return out


def test_retried_insert_changes_no_table_and_mvs_equal_raw(client, migrated: str) -> None:
    month_end = datetime(2026, 1, 31, 23, 40, tzinfo=UTC)  # the batch spans two monthly partitions
    first = _usage_rows("dedup-a", 120, month_end, src_offset=10)
    second = _usage_rows("dedup-b", 80, month_end + timedelta(hours=5), src_offset=20)
    _insert(client, migrated, first, token="usage.priced/0/10-10")
    _insert(client, migrated, second, token="usage.priced/0/20-20")

    after_two = _aggregate_vs_raw(client, migrated)
    for table, (aggregated, raw) in after_two.items():
        assert aggregated == raw, table
        assert aggregated, table
    events = client.query(f"SELECT count(), sum(cost_nanos) FROM {migrated}.usage_events").result_rows[0]
    assert events == (200, sum(r["cost_nanos"] for r in first + second))

    _insert(client, migrated, first, token="usage.priced/0/10-10")  # a batch re-sent after a crash
    _insert(client, migrated, second, token="usage.priced/0/20-20")
    assert _aggregate_vs_raw(client, migrated) == after_two
    assert client.query(f"SELECT count(), sum(cost_nanos) FROM {migrated}.usage_events").result_rows[0] == events

    # the same rows under a new token are a new batch: the windows dedupe tokens, not content
    _insert(client, migrated, second, token="usage.priced/1/0-0")
    assert client.query(f"SELECT count() FROM {migrated}.usage_events").result_rows[0][0] == 280
    for table, (aggregated, raw) in _aggregate_vs_raw(client, migrated).items():
        assert aggregated == raw, table


# --- analyst views --------------------------------------------------------------------------------


def test_analyst_views_show_only_the_tenant_in_log_comment(client, migrated: str) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    _insert(client, migrated, _usage_rows("view-a", 30, start, 100), token="views-a")
    _insert(client, migrated, _usage_rows("view-b", 30, start, 200), token="views-b")
    client.command(
        f"INSERT INTO {migrated}.projects (tenant, id, name, deleted, version) VALUES "
        "('view-a', 'p1', 'one', 0, 1), ('view-a', 'p1', 'one', 1, 2), ('view-a', 'p2', 'two', 0, 1), "
        "('view-b', 'p1', 'other', 0, 1)"
    )
    tenant_db = f"{migrated}_tenant"
    scoped = {"log_comment": "view-a", "readonly": 1}
    for view in sorted(_tables(client, tenant_db)):
        tenants = client.query(f"SELECT DISTINCT tenant FROM {tenant_db}.{view}", settings=scoped).result_rows
        assert tenants in ([], [("view-a",)]), view
        with pytest.raises(DatabaseError, match="no tenant scope"):
            client.query(f"SELECT count() FROM {tenant_db}.{view}")
    assert client.query(f"SELECT count() FROM {tenant_db}.usage_events", settings=scoped).result_rows == [(30,)]
    assert client.query(f"SELECT sum(calls) FROM {tenant_db}.usage_daily", settings=scoped).result_rows == [(30,)]
    # current state only: p1's latest version is deleted
    assert client.query(f"SELECT id, name FROM {tenant_db}.projects", settings=scoped).result_rows == [("p2", "two")]


def test_readonly_keeps_a_statement_from_choosing_another_tenant(client, migrated: str) -> None:
    with pytest.raises(DatabaseError, match="readonly"):
        client.query(
            f"SELECT count() FROM {migrated}_tenant.usage_events SETTINGS log_comment = 'view-b'",
            settings={"log_comment": "view-a", "readonly": 1},
        )


# --- migrator behaviour ---------------------------------------------------------------------------


@pytest.fixture
def fresh(make_settings: Callable[..., Settings], client, tmp_path: Path) -> tuple[Settings, Path]:
    """A new database name and a private copy of the schema directory to edit."""
    schema = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, schema)
    settings = make_settings()
    yield settings, schema
    _drop(client, settings)


def test_dry_run_lists_pending_files_and_changes_nothing(client, fresh) -> None:
    settings, schema = fresh
    lines: list[str] = []
    pending = apply_migrations(client, settings, dry_run=True, schema_dir=schema, echo=lines.append)
    assert pending == [m.name for m in load_migrations(schema)]
    assert lines == [f"pending: {name}" for name in pending]
    lines.clear()
    apply_migrations(client, settings, dry_run=True, cluster="prod", schema_dir=schema, echo=lines.append)
    ddl = [line for line in lines if not line.startswith("pending: ")]
    assert len(ddl) > len(pending) and all(" ON CLUSTER 'prod'" in line for line in ddl)
    assert (
        f"CREATE TABLE IF NOT EXISTS {settings.clickhouse.database}.usage_events_local ON CLUSTER 'prod'"
        in "\n".join(ddl)
    )
    assert not client.command(f"EXISTS DATABASE {settings.clickhouse.database}")


def test_edited_or_missing_applied_file_is_refused_by_name(client, fresh) -> None:
    settings, schema = fresh
    apply_migrations(client, settings, schema_dir=schema, echo=quiet)
    edited = schema / "0003_ingest_progress_unpriced.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    (schema / "0007_more.sql").write_text(
        "CREATE TABLE IF NOT EXISTS {db}.more (a UInt8) ENGINE = MergeTree ORDER BY a;\n"
    )
    for dry_run in (True, False):
        with pytest.raises(MigrationError, match=r"0003_ingest_progress_unpriced\.sql was edited"):
            apply_migrations(client, settings, schema_dir=schema, dry_run=dry_run, echo=quiet)
    assert not client.command(f"EXISTS TABLE {settings.clickhouse.database}.more")
    edited.unlink()
    with pytest.raises(MigrationError, match=r"0003_ingest_progress_unpriced\.sql was applied but is missing"):
        apply_migrations(client, settings, schema_dir=schema, echo=quiet)


def test_cli_exits_non_zero_naming_the_edited_file(settings: Settings, migrated: str, tmp_path: Path) -> None:
    # the CLI applies the repository's files, so make one applied record disagree instead
    with get_client(settings, database="system") as c:
        c.command(
            f"ALTER TABLE {migrated}.schema_migrations UPDATE checksum = 'x' WHERE name = '0005_alert_history.sql'",
            settings={"mutations_sync": 2},
        )
        try:
            result = _run_cli(settings)
        finally:
            fixed = {m.name: m.checksum for m in load_migrations()}["0005_alert_history.sql"]
            c.command(
                f"ALTER TABLE {migrated}.schema_migrations UPDATE checksum = '{fixed}' WHERE name = '0005_alert_history.sql'",
                settings={"mutations_sync": 2},
            )
    assert result.returncode == 1
    assert "0005_alert_history.sql was edited" in result.stderr


MIGRATE_CLI = [sys.executable, "-m", "spendstream.cli", "migrate"]


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "SPENDSTREAM_CLICKHOUSE__URL": settings.clickhouse_url,
        "SPENDSTREAM_CLICKHOUSE__DATABASE": settings.clickhouse.database,
    }


def _run_cli(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        MIGRATE_CLI, env=_cli_env(settings), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def test_two_migrator_processes_apply_each_file_once(client, fresh) -> None:
    settings, _ = fresh
    procs = [
        subprocess.Popen(MIGRATE_CLI, env=_cli_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied = [line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("applied ")]
    assert sorted(applied) == [m.name for m in load_migrations()]
    _assert_serialised(client, settings.clickhouse.database, runs=2)


def test_racing_migrators_take_turns_on_the_lock(client, fresh) -> None:
    settings, schema = fresh
    barrier = threading.Barrier(3)
    results: list[list[str] | BaseException] = []

    def run() -> None:
        with get_client(settings, database="system") as own:
            barrier.wait()
            try:
                results.append(apply_migrations(own, settings, schema_dir=schema, echo=quiet, lock_stale_after_s=60))
            except BaseException as exc:  # surfaced by the assertion below
                results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(sum(results, [])) == [m.name for m in load_migrations(schema)], results
    _assert_serialised(client, settings.clickhouse.database, runs=3)


def _assert_serialised(client, database: str, runs: int) -> None:
    """Each run held its own epoch, and no two holdings overlapped in time."""
    holdings = client.query(
        f"SELECT epoch, uniqExact(owner), minIf(at, event = 'acquire'), maxIf(at, event = 'release') "
        f"FROM {database}.schema_migrations_lock GROUP BY epoch ORDER BY epoch"
    ).result_rows
    assert [h[0] for h in holdings] == list(range(1, runs + 1))
    assert all(h[1] == 1 for h in holdings)
    for earlier, later in zip(holdings, holdings[1:]):
        assert earlier[3] <= later[2]
    names = client.query(f"SELECT name FROM {database}.schema_migrations ORDER BY name").result_rows
    assert [n[0] for n in names] == [m.name for m in load_migrations()]


def test_a_stale_lock_is_taken_over_and_a_live_one_waited_for(client, fresh) -> None:
    settings, schema = fresh
    database = settings.clickhouse.database
    for statement in BOOTSTRAP:
        client.command(render(statement, database))
    lock_row = (
        f"INSERT INTO {database}.schema_migrations_lock SELECT {{e:UInt64}}, 'acquire', 'crashed-host:1', {{at:String}}"
    )

    client.command(lock_row, parameters={"e": 1, "at": _server_now(client)})
    with pytest.raises(MigrationError, match="held by crashed-host:1"):
        apply_migrations(client, settings, schema_dir=schema, echo=quiet, lock_timeout_s=0.5, lock_stale_after_s=60)
    assert not client.command(f"EXISTS TABLE {database}.usage_events")

    stale = (datetime.fromisoformat(_server_now(client)) - timedelta(minutes=10)).isoformat(sep=" ")
    client.command(lock_row, parameters={"e": 2, "at": stale})
    applied = apply_migrations(client, settings, schema_dir=schema, echo=quiet, lock_timeout_s=5, lock_stale_after_s=60)
    assert applied == [m.name for m in load_migrations(schema)]
    owners = client.query(
        f"SELECT epoch, owner FROM {database}.schema_migrations_lock WHERE event = 'acquire' ORDER BY epoch"
    ).result_rows
    assert [o[0] for o in owners] == [1, 2, 3] and owners[2][1] != "crashed-host:1"


def _server_now(client) -> str:
    return client.query("SELECT toString(now64(3, 'UTC'))").result_rows[0][0]


def test_usage_ttl_follows_settings(client, fresh) -> None:
    settings, schema = fresh
    database = settings.clickhouse.database

    def engine() -> str:
        return client.query(
            "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = 'usage_events'",
            parameters={"db": database},
        ).result_rows[0][0]

    apply_migrations(client, settings, schema_dir=schema, echo=quiet)
    assert " TTL " not in engine()
    with_ttl = settings.model_copy(update={"clickhouse": settings.clickhouse.model_copy(update={"usage_ttl_days": 30})})
    lines: list[str] = []
    apply_migrations(client, with_ttl, schema_dir=schema, echo=lines.append)
    assert "TTL timestamp + toIntervalDay(30)" in engine()
    assert lines == [f"applied ALTER TABLE {database}.usage_events MODIFY TTL timestamp + INTERVAL 30 DAY"]
    lines.clear()
    apply_migrations(client, with_ttl, schema_dir=schema, echo=lines.append)
    assert lines == [f"{database}: up to date ({len(load_migrations(schema))} files applied)"]
    apply_migrations(client, settings, schema_dir=schema, echo=quiet)
    assert " TTL " not in engine()


# --- cluster form ---------------------------------------------------------------------------------


def test_derived_cluster_ddl_parses_in_clickhouse(client) -> None:
    statements = [(s, False) for m in load_migrations() for s in m.statements] + [(s, True) for s in BOOTSTRAP]
    derived = [d for s, wide in statements for d in cluster_statements(s, "prod-1", cluster_wide=wide)]
    assert len(derived) > len(statements)
    for sql in derived:
        formatted = client.query("SELECT formatQuery({q:String})", parameters={"q": render(sql, "spendstream")})
        assert "ON CLUSTER `prod-1`" in formatted.result_rows[0][0]
