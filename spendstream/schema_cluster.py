"""Derive the ClickHouse-cluster form of a schema statement from the single-node files.

The single-node files in clickhouse/schema/ stay the only source; ``migrate --cluster NAME``
passes every statement through :func:`cluster_statements`:

- ``CREATE DATABASE``, ``CREATE VIEW`` and ``CREATE OR REPLACE VIEW``: the same statement
  ``ON CLUSTER`` (views read the public, Distributed names).
- ``CREATE TABLE {db}.t (...) ENGINE = XMergeTree(args) ...``: a local table ``{db}.t_local`` with
  ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', args)`` on
  every node, plus ``{db}.t`` as ``Distributed(cluster, db, t_local[, cityHash64(tenant)])`` with the
  public name, so readers and writers keep using ``t``. Tables with a ``tenant`` column are sharded
  by tenant (a tenant's rows, and so its aggregates and ReplacingMergeTree versions, live on one
  shard); the others (MV targets without tenant) are written only through their MVs.
- ``CREATE TABLE {db}.t (...) ENGINE = Null``: the same pair, the local table staying ``Null``
  (it stores nothing; the MVs reading it write each shard's local tables).
- ``CREATE MATERIALIZED VIEW {db}.v TO {db}.t AS SELECT ... FROM {db}.s``: ``ON CLUSTER``, reading the
  local source ``s_local`` and writing the local target ``t_local`` on each shard.
- ``ALTER TABLE {db}.v MODIFY QUERY SELECT ... FROM {db}.s``: a materialized view keeps its name on
  the cluster, so ``ON CLUSTER`` on ``v`` itself, its query reading the local source ``s_local``
  as in its CREATE.
- ``ALTER TABLE {db}.t ...``: on ``t_local`` ``ON CLUSTER``, and on the Distributed ``t`` too when it
  changes columns.
- ``DETACH TABLE IF EXISTS {db}.v`` / ``ATTACH TABLE IF NOT EXISTS {db}.v`` (reloading a materialized
  view from its metadata): ``ON CLUSTER`` on ``v`` itself, which keeps its name on the cluster.
- ``cluster_wide=True`` (the migrator's own bookkeeping tables): one Replicated table across all
  nodes of the cluster, without Distributed table.

Replicated engines deduplicate inserts natively (``replicated_deduplication_window``), including in
dependent MVs with ``deduplicate_blocks_in_dependent_materialized_views = 1``; the
``non_replicated_deduplication_window`` setting kept from the files has no effect there.

Statements are expected in the files' house form (``IF NOT EXISTS``, ``{db}``-qualified names);
anything else raises :class:`ClusterSchemaError` so a new kind of statement cannot slip into a
cluster unconverted. Pure: no ClickHouse imports.
"""

from __future__ import annotations

import re

SHARD_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
SHARD_REPLICA = "{replica}"
# One replica set spanning every node: the path has no {shard}, so replica names must be
# unique across shards, which (shard, replica) always is.
CLUSTER_WIDE_PATH = "/clickhouse/tables/{database}/{table}"
CLUSTER_WIDE_REPLICA = "{shard}-{replica}"
SHARDING_KEY = "cityHash64(tenant)"
LOCAL_SUFFIX = "_local"

CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CREATE_DATABASE = re.compile(r"^CREATE\s+DATABASE\s+IF\s+NOT\s+EXISTS\s+(\S+)(.*)$", re.S | re.I)
_CREATE_VIEW = re.compile(
    r"^(CREATE\s+VIEW\s+IF\s+NOT\s+EXISTS|CREATE\s+OR\s+REPLACE\s+VIEW)\s+(\S+)\s+(AS\s.*)$", re.S | re.I
)
_CREATE_TABLE = re.compile(r"^CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+\{db\}\.(\w+)\s*(\(.*)$", re.S | re.I)
_CREATE_MV = re.compile(
    r"^CREATE\s+MATERIALIZED\s+VIEW\s+IF\s+NOT\s+EXISTS\s+(\{db\}\.\w+)\s+TO\s+\{db\}\.(\w+)\s+(AS\s.*)$", re.S | re.I
)
_MV_SOURCE = re.compile(r"\bFROM\s+\{db\}\.(\w+)", re.I)
_MODIFY_QUERY = re.compile(r"^ALTER\s+TABLE\s+(\{db\}\.\w+)\s+(MODIFY\s+QUERY\s.*)$", re.S | re.I)
_ALTER_TABLE = re.compile(r"^ALTER\s+TABLE\s+\{db\}\.(\w+)\s+(.*)$", re.S | re.I)
_COLUMN_ALTER = re.compile(r"\b(ADD|DROP|MODIFY|RENAME|COMMENT|CLEAR)\s+COLUMN\b", re.I)
_RELOAD = re.compile(
    r"^(DETACH\s+TABLE\s+IF\s+EXISTS|ATTACH\s+TABLE\s+IF\s+NOT\s+EXISTS)\s+(\{db\}\.\w+)\s*$", re.S | re.I
)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(\w+)\s*", re.I)


class ClusterSchemaError(ValueError):
    pass


def validate_cluster_name(cluster: str) -> str:
    if not CLUSTER_NAME.match(cluster):
        raise ClusterSchemaError(f"cluster name {cluster!r} must match {CLUSTER_NAME.pattern}")
    return cluster


def cluster_statements(statement: str, cluster: str, *, cluster_wide: bool = False) -> list[str]:
    """The ON CLUSTER statements replacing one single-node statement (still with ``{db}``)."""
    on_cluster = f"ON CLUSTER '{validate_cluster_name(cluster)}'"
    statement = statement.strip()
    if m := _CREATE_DATABASE.match(statement):
        return [f"CREATE DATABASE IF NOT EXISTS {m[1]} {on_cluster}{m[2]}"]
    if m := _CREATE_VIEW.match(statement):
        return [f"{m[1]} {m[2]} {on_cluster} {m[3]}"]
    if m := _CREATE_MV.match(statement):
        select = _from_local_source(m[3], m[1], statement)
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {m[1]} {on_cluster} TO {{db}}.{m[2]}{LOCAL_SUFFIX} {select}"]
    if m := _MODIFY_QUERY.match(statement):
        return [f"ALTER TABLE {m[1]} {on_cluster} {_from_local_source(m[2], m[1], statement)}"]
    if m := _RELOAD.match(statement):
        return [f"{m[1]} {m[2]} {on_cluster}"]
    if m := _CREATE_TABLE.match(statement):
        return _create_table(m[1], m[2], cluster, on_cluster, cluster_wide)
    if m := _ALTER_TABLE.match(statement):
        name, commands = m[1], m[2]
        derived = [f"ALTER TABLE {{db}}.{name}{LOCAL_SUFFIX} {on_cluster} {commands}"]
        if _COLUMN_ALTER.search(commands):
            derived.append(f"ALTER TABLE {{db}}.{name} {on_cluster} {commands}")
        return derived
    raise ClusterSchemaError(
        "no cluster form for this statement (expected CREATE DATABASE/TABLE/VIEW/MATERIALIZED VIEW "
        "IF NOT EXISTS, CREATE OR REPLACE VIEW, ALTER TABLE, DETACH TABLE IF EXISTS or ATTACH TABLE IF NOT EXISTS on "
        f"{{db}}-qualified names): {statement[:200]}"
    )


def _from_local_source(select: str, view: str, statement: str) -> str:
    """A view's query reading its source's local table. Only the first FROM is the table the view
    listens to; other references stay public."""
    if not _MV_SOURCE.search(select):
        raise ClusterSchemaError(f"materialized view {view} has no FROM {{db}}.<table> source: {statement[:200]}")
    return _MV_SOURCE.sub(lambda s: f"FROM {{db}}.{s[1]}{LOCAL_SUFFIX}", select, count=1)


def _create_table(name: str, body: str, cluster: str, on_cluster: str, cluster_wide: bool) -> list[str]:
    columns_end = _closing_paren(body, 0)
    columns, rest = body[: columns_end + 1], body[columns_end + 1 :]
    engine = _ENGINE.match(rest.lstrip())
    rest = rest.lstrip()
    if engine and engine[1] == "Null" and not cluster_wide:
        # stores nothing (its MVs do): one per node, written through the Distributed table
        return _local_and_distributed(name, columns, f"{columns}\nENGINE = Null", cluster, on_cluster)
    if not engine or not engine[1].endswith("MergeTree") or engine[1].startswith("Replicated"):
        raise ClusterSchemaError(f"table {name}: only non-replicated *MergeTree or Null engines can be derived")
    args_start = engine.end()
    if rest.startswith("(", args_start):
        args_end = _closing_paren(rest, args_start)
        args = rest[args_start + 1 : args_end].strip()
        after = rest[args_end + 1 :]
    else:
        args, after = "", rest[args_start:]
    path, replica = (CLUSTER_WIDE_PATH, CLUSTER_WIDE_REPLICA) if cluster_wide else (SHARD_PATH, SHARD_REPLICA)
    engine_args = ", ".join(filter(None, [f"'{path}'", f"'{replica}'", args]))
    table = f"{columns}\nENGINE = Replicated{engine[1]}({engine_args})\n{after.lstrip()}".rstrip()
    if cluster_wide:
        return [f"CREATE TABLE IF NOT EXISTS {{db}}.{name} {on_cluster} {table}"]
    return _local_and_distributed(name, columns, table, cluster, on_cluster)


def _local_and_distributed(name: str, columns: str, table: str, cluster: str, on_cluster: str) -> list[str]:
    local = f"{name}{LOCAL_SUFFIX}"
    sharding = f", {SHARDING_KEY}" if "tenant" in _column_names(columns) else ""
    return [
        f"CREATE TABLE IF NOT EXISTS {{db}}.{local} {on_cluster} {table}",
        f"CREATE TABLE IF NOT EXISTS {{db}}.{name} {on_cluster} AS {{db}}.{local}\n"
        f"ENGINE = Distributed('{cluster}', '{{db}}', '{local}'{sharding})",
    ]


def _closing_paren(text: str, start: int) -> int:
    """Index of the ')' matching the '(' at ``start``, skipping quoted text."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch in "'`\"":
            i = text.index(ch, i + 1)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ClusterSchemaError(f"unbalanced parentheses in: {text[:200]}")


def _column_names(columns: str) -> list[str]:
    """Names in a ``(col Type, ..., INDEX ...)`` list: the first word of each top-level element."""
    inner, names, depth, start = columns[1:-1], [], 0, 0
    for i, ch in enumerate(inner + ","):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            words = inner[start:i].split()
            if words and words[0].upper() not in ("INDEX", "PROJECTION", "CONSTRAINT"):
                names.append(words[0].strip("`"))
            start = i + 1
    return names
