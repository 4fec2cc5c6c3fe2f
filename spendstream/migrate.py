"""`spendstream migrate`: apply clickhouse/schema/NNNN_name.sql in order, forward only.

The files ship inside the package as ``spendstream/schema/`` (a link to clickhouse/schema/ in the
repository, followed when the wheel is built) and are read with importlib.resources, so an
installed wheel migrates from anywhere, like a checkout.

Each applied file is recorded with its SHA-256 in ``schema_migrations``; a run refuses to start
when an applied file's checksum changed (edit a schema by adding a file, never by editing one).
Files use ``{db}`` for the database, substituted with ``settings.clickhouse.database``; every
statement must be re-runnable (IF NOT EXISTS), because a file interrupted half-way is applied
again from its first statement.

Concurrent migrators: a lock table, ``schema_migrations_lock``, turns ClickHouse's insert
deduplication into a compare-and-set. Lock holders are numbered (epochs); to take epoch n+1 a
migrator inserts its row with ``insert_deduplication_token = 'acquire-<n+1>'``. Only the first such
insert is stored, so reading epoch n+1 back tells every contender who won. The holder inserts a
heartbeat row before each statement (and checks it still holds the newest epoch) and a release row
at the end; a lock without a row for ``stale_after_s`` seconds (a crashed migrator) is taken over
with the next epoch. Needs no ZooKeeper on a single node; on a cluster the same table is Replicated
and the deduplication is done by Keeper.

With ``cluster`` set, every statement is rewritten by :mod:`spendstream.schema_cluster` into its
ON CLUSTER form (Replicated local tables + Distributed tables with the public names).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from spendstream.schema_cluster import cluster_statements, validate_cluster_name
from spendstream.settings import Settings

SCHEMA_DIR: Traversable = files("spendstream") / "schema"
MIGRATION_FILE = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")
DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Bootstrap DDL the migrator itself needs before it can read what was applied. Like the schema
# files it uses {db} and goes through the cluster derivation (as cluster-wide tables).
BOOTSTRAP = (
    "CREATE DATABASE IF NOT EXISTS {db}",
    """CREATE TABLE IF NOT EXISTS {db}.schema_migrations
(
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY name""",
    # The deduplication window is what makes the lock's compare-and-set work; it must cover the
    # rows written between reading the newest epoch and inserting the next one (a few).
    """CREATE TABLE IF NOT EXISTS {db}.schema_migrations_lock
(
    epoch UInt64,
    event LowCardinality(String),
    owner String,
    at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (epoch, at)
SETTINGS non_replicated_deduplication_window = 10000""",
)


class MigrationError(Exception):
    """A refusal or failure with a message meant for the operator."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str
    checksum: str

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def load_migrations(schema_dir: Traversable = SCHEMA_DIR) -> list[Migration]:
    sql_files = sorted((p for p in schema_dir.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    bad = [p.name for p in sql_files if not MIGRATION_FILE.match(p.name)]
    if bad:
        raise MigrationError(f"schema files must be named NNNN_name.sql: {', '.join(bad)}")
    migrations = []
    for path in sql_files:
        data = path.read_bytes()
        migrations.append(Migration(path.name, data.decode(), hashlib.sha256(data).hexdigest()))
    return migrations


def split_statements(sql: str) -> list[str]:
    """Split on top-level ';', dropping comments; quotes and comments may contain ';'."""
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            i = _index_or_end(sql, "\n", i)
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise MigrationError("unterminated /* comment")
            i = end + 2
            current.append(" ")
        elif ch in "'\"`":
            j = i + 1
            while j < n and sql[j] != ch:
                j += 2 if sql[j] == "\\" else 1
            if j >= n:
                raise MigrationError(f"unterminated {ch} quote")
            current.append(sql[i : j + 1])
            i = j + 1
        elif ch == ";":
            statements.append("".join(current))
            current = []
            i += 1
        else:
            current.append(ch)
            i += 1
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def _index_or_end(text: str, sub: str, start: int) -> int:
    found = text.find(sub, start)
    return len(text) if found < 0 else found


def render(statement: str, database: str) -> str:
    return statement.replace("{db}", database)


class MigrationLock:
    """See the module docstring. Use as a context manager; call :meth:`heartbeat` between steps."""

    def __init__(self, client, database: str, *, timeout_s: float, stale_after_s: float, poll_s: float = 0.2):
        self.client = client
        self.table = f"{database}.schema_migrations_lock"
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None
        self._beats = 0

    def __enter__(self) -> MigrationLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            epoch, holder, released, idle_s = self._newest()
            if epoch == 0 or released or idle_s > self.stale_after_s:
                self._write(epoch + 1, "acquire", f"acquire-{epoch + 1}")
                if self._holder(epoch + 1) == self.owner:
                    self.epoch = epoch + 1
                    return
            elif time.monotonic() > deadline:
                raise MigrationError(
                    f"timed out after {self.timeout_s:.0f} s waiting for the migration lock held by {holder} "
                    f"(epoch {epoch}, idle {idle_s:.0f} s; taken over after {self.stale_after_s:.0f} s idle)"
                )
            time.sleep(self.poll_s)

    def heartbeat(self) -> None:
        epoch, holder, _, _ = self._newest()
        if epoch != self.epoch:
            raise MigrationError(
                f"lost the migration lock: {holder} took it over (epoch {epoch}) after this run was idle "
                f"for more than {self.stale_after_s:.0f} s; nothing more was applied"
            )
        self._beats += 1
        self._write(self.epoch, "heartbeat", f"heartbeat-{self.epoch}-{self._beats}")

    def release(self) -> None:
        if self.epoch is not None:
            self._write(self.epoch, "release", f"release-{self.epoch}")
            self.epoch = None

    def _write(self, epoch: int, event: str, token: str) -> None:
        # Server time (now64) on both sides of the staleness comparison: migrators may run on
        # hosts with skewed clocks.
        self.client.command(
            f"INSERT INTO {self.table} SELECT {{epoch:UInt64}}, {{event:String}}, {{owner:String}}, now64(3)",
            parameters={"epoch": epoch, "event": event, "owner": self.owner},
            settings={"insert_deduplication_token": token, "insert_deduplicate": 1},
        )

    def _newest(self) -> tuple[int, str, bool, float]:
        rows = self.client.query(
            f"""SELECT epoch,
                       argMinIf(owner, (at, owner), event = 'acquire'),
                       countIf(event = 'release') > 0,
                       dateDiff('millisecond', max(at), now64(3)) / 1000
                FROM {self.table}
                WHERE epoch = (SELECT max(epoch) FROM {self.table})
                GROUP BY epoch"""
        ).result_rows
        if not rows:
            return 0, "", True, 0.0
        epoch, holder, released, idle_s = rows[0]
        return int(epoch), holder, bool(released), float(idle_s)

    def _holder(self, epoch: int) -> str:
        # The earliest acquire row wins; there is more than one only if a contender's insert fell
        # outside the deduplication window, and then every contender still agrees on the winner.
        rows = self.client.query(
            f"SELECT argMin(owner, (at, owner)) FROM {self.table} WHERE epoch = {{epoch:UInt64}} AND event = 'acquire'",
            parameters={"epoch": epoch},
        ).result_rows
        return rows[0][0] if rows else ""


def apply_migrations(
    client,
    settings: Settings,
    *,
    cluster: str | None = None,
    dry_run: bool = False,
    schema_dir: Traversable = SCHEMA_DIR,
    lock_timeout_s: float = 600.0,
    lock_stale_after_s: float = 120.0,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Apply pending files (or, with dry_run, only list them); returns their names.

    ``client`` is a sync clickhouse-connect client on any database (statements are qualified).
    Raises MigrationError on an edited or missing applied file, a bad name, or a lock timeout.
    """
    database = settings.clickhouse.database
    if not DATABASE_NAME.match(database):
        raise MigrationError(f"database name {database!r} must match {DATABASE_NAME.pattern}")
    if cluster:
        validate_cluster_name(cluster)
    migrations = load_migrations(schema_dir)

    def derived(statements: Iterable[str], *, cluster_wide: bool = False) -> list[str]:
        """The SQL to run for ``statements``: as written, or their cluster form."""
        out = []
        for statement in statements:
            for sql in cluster_statements(statement, cluster, cluster_wide=cluster_wide) if cluster else [statement]:
                out.append(render(sql, database))
        return out

    def execute(statements: Iterable[str], *, cluster_wide: bool = False, beat: Callable[[], None] = lambda: None):
        for sql in derived(statements, cluster_wide=cluster_wide):
            beat()
            client.command(sql)

    if dry_run:
        applied = _applied(client, database) if _has_migrations_table(client, database) else {}
        _check_applied(applied, migrations)
        pending = [m for m in migrations if m.name not in applied]
        for m in pending:
            echo(f"pending: {m.name}")
            if cluster:
                for sql in derived(m.statements):
                    echo(sql + ";")
        ttl_change = _usage_ttl_change(client, database, settings.clickhouse.usage_ttl_days, cluster)
        if ttl_change:
            for sql in derived([ttl_change]):
                echo(f"pending: {sql}")
        if not pending and not ttl_change:
            echo(f"{database}: up to date ({len(migrations)} files applied)")
        return [m.name for m in pending]

    execute(BOOTSTRAP, cluster_wide=True)
    done: list[str] = []
    with MigrationLock(client, database, timeout_s=lock_timeout_s, stale_after_s=lock_stale_after_s) as lock:
        applied = _applied(client, database)
        _check_applied(applied, migrations)
        for m in migrations:
            if m.name in applied:
                continue
            started = time.monotonic()
            execute(m.statements, beat=lock.heartbeat)
            lock.heartbeat()
            client.command(
                f"INSERT INTO {database}.schema_migrations SELECT {{name:String}}, {{checksum:String}}, now64(3)",
                parameters={"name": m.name, "checksum": m.checksum},
            )
            done.append(m.name)
            echo(f"applied {m.name} ({len(m.statements)} statements, {time.monotonic() - started:.2f} s)")
        ttl_change = _usage_ttl_change(client, database, settings.clickhouse.usage_ttl_days, cluster)
        if ttl_change:
            execute([ttl_change], beat=lock.heartbeat)
            echo(f"applied {render(ttl_change, database)}")
    if not done and not ttl_change:
        echo(f"{database}: up to date ({len(migrations)} files applied)")
    return done


def _has_migrations_table(client, database: str) -> bool:
    return bool(
        client.query(
            "SELECT count() FROM system.tables WHERE database = {db:String} AND name = 'schema_migrations'",
            parameters={"db": database},
        ).result_rows[0][0]
    )


def _applied(client, database: str) -> dict[str, str]:
    rows = client.query(f"SELECT name, checksum FROM {database}.schema_migrations").result_rows
    return {name: checksum for name, checksum in rows}


def _check_applied(applied: dict[str, str], migrations: list[Migration]) -> None:
    on_disk = {m.name: m for m in migrations}
    for name, checksum in sorted(applied.items()):
        if name not in on_disk:
            raise MigrationError(
                f"{name} was applied but is missing from the schema directory; schema files are forward-only"
            )
        if on_disk[name].checksum != checksum:
            raise MigrationError(
                f"{name} was edited after it was applied (sha256 {checksum[:12]}… in schema_migrations, "
                f"{on_disk[name].checksum[:12]}… on disk); revert it and put the change in a new file"
            )


def _usage_ttl_change(client, database: str, ttl_days: int, cluster: str | None) -> str | None:
    """The ALTER that makes usage_events' TTL match settings, or None when it already does.

    The TTL is configuration, not schema (it may differ per deployment), so it is reconciled on
    every run instead of living in a schema file.
    """
    table = "usage_events_local" if cluster else "usage_events"
    rows = client.query(
        "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": database, "t": table},
    ).result_rows
    # On a dry run against a new database nothing exists yet: the TTL is set on the real run.
    engine = rows[0][0] if rows else ""
    found = re.search(r"\bTTL (.+?)(?: SETTINGS |$)", engine)
    current = found.group(1) if found else None
    # ClickHouse prints `INTERVAL n DAY` back as toIntervalDay(n)
    wanted = f"timestamp + toIntervalDay({ttl_days})" if ttl_days else None
    if not rows or current == wanted:
        return None
    if wanted:
        return f"ALTER TABLE {{db}}.usage_events MODIFY TTL timestamp + INTERVAL {ttl_days} DAY"
    return "ALTER TABLE {db}.usage_events REMOVE TTL"


def main(settings: Settings, dry_run: bool = False, cluster: str | None = None) -> int:
    """Entry point of `spendstream migrate`; returns the exit status."""
    from spendstream.clickhouse import get_client

    cluster = cluster or settings.clickhouse.cluster or None
    try:
        # `system` always exists; the target database may not yet.
        client = get_client(settings, database="system")
        try:
            apply_migrations(client, settings, cluster=cluster, dry_run=dry_run)
        finally:
            client.close()
    except MigrationError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    return 0
