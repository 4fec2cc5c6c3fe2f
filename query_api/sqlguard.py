"""What an analyst's statement may touch, decided on ClickHouse's own parse of it. Pure.

POST /v1/sql runs a statement in three steps, all by ClickHouse (see ``routers/sql.py``):

1. ``formatQuerySingleLine({sql:String})``: the statement is bound as data and ClickHouse's parser
   returns its canonical single-line text: one statement, comments gone (several statements are
   a syntax error). Only that canonical text is used from here on.
2. ``EXPLAIN AST <canonical>``: the unresolved syntax tree, checked by ``check_ast`` before
   anything is evaluated: a SELECT only, no SETTINGS/FORMAT/INTO OUTFILE, only the tenant views
   as qualified tables, only harmless table functions, no function that
   reads outside the query's tables (dictionaries, joinGet, file, ...).
3. ``EXPLAIN QUERY TREE <canonical>``, run like the statement itself (tenant views database,
   tenant in ``log_comment``, readonly): the analyzer's resolved tree, checked by
   ``check_query_tree``: every table it reads is a view in the tenant database (this also
   catches ``x IN db.table``, which the syntax tree cannot tell from a column).

Then the statement runs with database = the tenant views, log_comment = the key's tenant and
readonly = 1, which makes ClickHouse refuse any write or settings change, and the views filter
every row by that tenant. The checks here stop a statement from reaching around the views.
"""

from __future__ import annotations

from dataclasses import dataclass

from query_api.errors import QueryRefused

#: Tenant-scoped views analysts may read (created by clickhouse/schema/0006_tenant_views.sql).
TENANT_VIEWS: frozenset[str] = frozenset(
    {
        "usage_events", "usage_minute", "usage_hourly", "usage_daily", "usage_tags_daily", "unpriced_models",
        "projects", "budgets", "price_overrides", "budget_alerts", "alert_deliveries",
    }
)
#: Table functions that generate rows and read nothing.
SAFE_TABLE_FUNCTIONS: frozenset[str] = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "values"}
)
#: Functions that read data or files outside the tables of the query, or stall a worker.
#: Compared case-insensitively; names starting with "dict" are all dictionary access.
FORBIDDEN_FUNCTIONS: frozenset[str] = frozenset(
    {
        "joinget", "joingetornull", "file", "catboostevaluate", "naivebayesclassifier", "hascolumnintable",
        "sleep", "sleepeachrow", "getserversetting", "getmergetreesetting", "addresstoline",
        "addresstolinewithinlines", "addresstosymbol", "demangle", "getclienthttpheader", "filesystemcapacity",
        "filesystemavailable", "filesystemunreserved", "getsubcolumn",
    }
)
_STATEMENT_ROOTS = ("SelectWithUnionQuery",)
#: what ClickHouse reads for a SELECT without FROM: one row, one constant column
_NO_TABLE = "system.one"


@dataclass(frozen=True)
class AstNode:
    depth: int
    kind: str
    text: str  # everything after the kind, e.g. "dictGet (children 1)" or "usage_events (alias u)"


def parse_explain(lines: list[str]) -> list[AstNode]:
    """``EXPLAIN AST`` / ``EXPLAIN QUERY TREE`` rows -> nodes (depth = leading spaces)."""
    nodes = []
    for line in lines:
        stripped = line.lstrip(" ")
        kind, _, text = stripped.partition(" ")
        nodes.append(AstNode(len(line) - len(stripped), kind, text))
    return nodes


def _name(text: str) -> str:
    """The name a node carries, without its "(alias x)" / "(children n)" suffixes."""
    for suffix in (" (children ", " (alias "):
        cut = text.find(suffix)
        if cut != -1:
            text = text[:cut]
    return text


def _is_forbidden_function(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("dict") or lowered in FORBIDDEN_FUNCTIONS


def _refuse(reason: str, message: str) -> QueryRefused:
    return QueryRefused(message, reason)


def check_ast(lines: list[str], tenant_db: str) -> None:
    """Refuse a statement whose syntax tree reaches outside the tenant views (see module doc)."""
    nodes = parse_explain(lines)
    if not nodes:
        raise _refuse("statement", "empty statement")
    root = nodes[0]
    if not root.kind.isidentifier():
        # EXPLAIN AST answers in TabSeparated, one node name per line, unless the statement's own
        # FORMAT clause chose another output format for it (an INSERT's canonical text has one too)
        raise _refuse(
            "clause", "only SELECT statements are allowed, without FORMAT, INTO OUTFILE or SETTINGS clauses; "
            "choose the format with the request"
        )
    if root.kind not in _STATEMENT_ROOTS:
        raise _refuse("statement", f"only SELECT statements are allowed (got {root.kind.removesuffix('Query') or 'an empty statement'})")
    # the root's children are the union list, then FORMAT / INTO OUTFILE / SETTINGS when present
    if sum(1 for n in nodes if n.depth == root.depth + 1) != 1:
        raise _refuse("clause", "FORMAT, INTO OUTFILE and SETTINGS clauses are not allowed; choose the format with the request")
    qualified_views = {f"{tenant_db}.{v}" for v in TENANT_VIEWS}
    for i, node in enumerate(nodes):
        if node.kind == "Set":
            raise _refuse("clause", "SETTINGS clauses are not allowed")
        if node.kind in ("SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "Subquery"):
            continue
        if node.kind == "TableIdentifier":
            # An unqualified name is a CTE or a table of the current database (the tenant views):
            # the query tree check resolves which. A qualified one must name a tenant view here,
            # before the analyzer evaluates anything (e.g. scalar subqueries) in step 3.
            name = _name(node.text)
            if "." in name and name not in qualified_views and name != _NO_TABLE:
                raise _refuse(
                    "table", f"table {name!r} is not available; query the tenant views: {', '.join(sorted(TENANT_VIEWS))}"
                )
        elif node.kind == "Function":
            name = _name(node.text)
            if _is_table_function(nodes, i):
                if name.lower() not in SAFE_TABLE_FUNCTIONS:
                    raise _refuse(
                        "table_function", f"table function {name}() is not allowed (allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))})"
                    )
            elif _is_forbidden_function(name):
                raise _refuse("function", f"function {name}() is not allowed: it reads data outside the tenant views")


def _is_table_function(nodes: list[AstNode], index: int) -> bool:
    parent = _parent(nodes, index)
    return parent is not None and parent.kind == "TableExpression"


def _parent(nodes: list[AstNode], index: int) -> AstNode | None:
    depth = nodes[index].depth
    for j in range(index - 1, -1, -1):
        if nodes[j].depth < depth:
            return nodes[j]
    return None


def _field(text: str, key: str) -> str | None:
    marker = f"{key}: "
    at = text.find(marker)
    if at == -1:
        return None
    return text[at + len(marker):]


def check_query_tree(lines: list[str], tenant_db: str) -> None:
    """Refuse unless every table the analyzer resolved is a tenant view (see module doc)."""
    for node in parse_explain(lines):
        if node.kind == "TABLE":
            value = _field(node.text, "table_name")
            if value is None or not _is_tenant_view(value, tenant_db):
                raise _refuse(
                    "table", f"the statement reads {(value or '?').split(',')[0]!r}; only the tenant views "
                    f"({', '.join(sorted(TENANT_VIEWS))}) are available"
                )
        elif node.kind == "TABLE_FUNCTION":
            name = (_field(node.text, "table_function_name") or "?").split(",")[0]
            if name.lower() not in SAFE_TABLE_FUNCTIONS:
                raise _refuse("table_function", f"table function {name}() is not allowed")
        elif node.kind == "FUNCTION":
            name = (_field(node.text, "function_name") or "").split(",")[0]
            if _is_forbidden_function(name):
                raise _refuse("function", f"function {name}() is not allowed: it reads data outside the tenant views")


def _is_tenant_view(value: str, tenant_db: str) -> bool:
    prefix = f"{tenant_db}."
    if value.split(",", 1)[0] == _NO_TABLE:
        return True
    if not value.startswith(prefix):
        return False
    rest = value[len(prefix):]
    table = rest.split(",", 1)[0]
    return table in TENANT_VIEWS
