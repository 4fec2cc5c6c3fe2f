"""The SQL guard's decisions on trees ClickHouse printed (EXPLAIN AST / EXPLAIN QUERY TREE)."""

import pytest

from query_api.errors import QueryRefused
from query_api.sqlguard import check_ast, check_query_tree, parse_explain

DB = "spendstream_tenant"


def ast(text: str) -> list[str]:
    return text.strip("\n").splitlines()


SELECT_VIEW = ast("""
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Identifier tenant
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier usage_events (alias e)
""")


def test_parse_explain_depths_and_kinds():
    nodes = parse_explain(SELECT_VIEW)
    assert [(n.depth, n.kind) for n in nodes[:3]] == [
        (0, "SelectWithUnionQuery"),
        (1, "ExpressionList"),
        (2, "SelectQuery"),
    ]
    assert nodes[-1].text == "usage_events (alias e)"


def test_plain_select_over_a_view_passes():
    check_ast(SELECT_VIEW, DB)
    check_ast([line.replace("usage_events (alias e)", f"{DB}.usage_daily") for line in SELECT_VIEW], DB)


@pytest.mark.parametrize(
    "replace, reason",
    [
        (("TableIdentifier usage_events (alias e)", "TableIdentifier spendstream.usage_events"), "table"),
        (("TableIdentifier usage_events (alias e)", "TableIdentifier system.tables"), "table"),
        (("TableIdentifier usage_events (alias e)", "Function url (children 1)"), "table_function"),
        (("Identifier tenant", "Function dictGetString (children 1)"), "function"),
        (("Identifier tenant", "Function JOINGET (children 1)"), "function"),
        (("Identifier tenant", "Function file (children 1)"), "function"),
        (("SelectWithUnionQuery (children 1)", "DropQuery  (children 1)"), "statement"),
        (("SelectWithUnionQuery (children 1)", "{"), "clause"),
    ],
)
def test_refusals_name_their_reason(replace, reason):
    old, new = replace
    with pytest.raises(QueryRefused) as err:
        check_ast([line.replace(old, new) for line in SELECT_VIEW], DB)
    assert err.value.reason == reason and err.value.field == "sql"


def test_settings_format_and_outfile_are_refused():
    with pytest.raises(QueryRefused, match="SETTINGS"):
        check_ast(SELECT_VIEW + ["   Set"], DB)
    with pytest.raises(QueryRefused, match="FORMAT"):
        check_ast(SELECT_VIEW + [" Literal 'out.csv'", " Identifier CSV"], DB)


def test_safe_table_functions_pass():
    check_ast(
        [
            line.replace("TableIdentifier usage_events (alias e)", "Function numbers (children 1)")
            for line in SELECT_VIEW
        ],
        DB,
    )


TREE = ast(f"""
QUERY id: 0
  JOIN TREE
    TABLE id: 3, alias: __table1, table_name: {DB}.usage_events, final: 1
  WHERE
    FUNCTION id: 4, function_name: in, function_type: ordinary, result_type: UInt8
""")


def test_query_tree_allows_tenant_views_and_system_one():
    check_query_tree(TREE, DB)
    check_query_tree(TREE + ["    TABLE id: 9, table_name: system.one"], DB)


@pytest.mark.parametrize(
    "line",
    [
        "        TABLE id: 7, table_name: spendstream.api_keys",
        f"        TABLE id: 7, table_name: {DB}.current_tenant",
        f"        TABLE id: 7, table_name: {DB}x.usage_events",
        "        TABLE_FUNCTION id: 8, alias: __table2, table_function_name: remote",
        "        FUNCTION id: 9, function_name: dictGet, function_type: ordinary, result_type: String",
    ],
)
def test_query_tree_refuses_anything_else(line):
    with pytest.raises(QueryRefused):
        check_query_tree(TREE + [line], DB)
