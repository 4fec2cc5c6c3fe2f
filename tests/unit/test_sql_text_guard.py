"""The SQL guard's first step, on the statement's text alone (nothing sent to ClickHouse), and the
pure parts of POST /v1/sql around it: error summaries, result bounds, the per-tenant slots."""

from __future__ import annotations

import pytest

from query_api.errors import QueryRefused, TooManyQueries
from query_api.routers.sql import TenantSlots, result_settings
from query_api.sqlguard import (
    NUMBER,
    QUOTED,
    STRING,
    WORD,
    analysis_error,
    check_ast,
    check_query_tree,
    check_text,
    tokenize,
)
from spendstream.settings import QueryApiSettings

DB = "spendstream_tenant"
RAW = frozenset({"spendstream"})


def kinds(sql: str) -> list[tuple[str, str]]:
    return [(t.kind, t.text) for t in tokenize(sql)]


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT 1 -- FROM x\n", [(WORD, "SELECT"), (NUMBER, "1")]),
        ("SELECT 1 // FROM x", [(WORD, "SELECT"), (NUMBER, "1")]),
        ("SELECT 1 # FROM x", [(WORD, "SELECT"), (NUMBER, "1")]),
        ("SELECT /* a /* nested */ FROM x */ 1", [(WORD, "SELECT"), (NUMBER, "1")]),
        ("SELECT 'it''s -- not a comment'", [(WORD, "SELECT"), (STRING, "it's -- not a comment")]),
        ("SELECT 'a\\' FROM x'", [(WORD, "SELECT"), (STRING, "a' FROM x")]),
        ("SELECT $tag$ FROM x $tag$", [(WORD, "SELECT"), (STRING, "$tag$ FROM x $tag$")]),
        ("SELECT x'41'", [(WORD, "SELECT"), (STRING, "x'41'")]),
        ('SELECT `a b`."c"', [(WORD, "SELECT"), (QUOTED, "a b"), ("punct", "."), (QUOTED, "c")]),
        ("SELECT t.1.2", [(WORD, "SELECT"), (WORD, "t"), ("punct", "."), (NUMBER, "1"), ("punct", "."), (NUMBER, "2")]),
        (
            "SELECT 1e5, .5, 0x1F, 1st",
            [
                (WORD, "SELECT"),
                *[(NUMBER, n) if n[0] != "," else ("punct", ",") for n in ("1e5", ",", ".5", ",", "0x1F", ",")],
                (WORD, "1st"),
            ],
        ),
        # ClickHouse skips Unicode spaces; anything else non-ASCII it refuses: both split words here
        ("SELECT\u00a0db\u2003.t", [(WORD, "SELECT"), (WORD, "db"), ("punct", "."), (WORD, "t")]),
    ],
)
def test_tokens_follow_clickhouses_lexer(sql, expected):
    assert kinds(sql) == expected


@pytest.mark.parametrize("sql", ["SELECT 'open", "SELECT `open", 'SELECT "open', "SELECT /* open", "SELECT x'4"])
def test_unclosed_literals_and_comments_are_syntax_errors(sql):
    with pytest.raises(QueryRefused, match="syntax error at position 8") as err:
        check_text(sql, DB, RAW)
    assert err.value.reason == "syntax" and err.value.field == "sql"


ALLOWED = [
    ("SELECT * FROM usage_events", frozenset()),
    ("(SELECT 1) UNION ALL (SELECT 2)", frozenset()),
    ("FROM usage_events SELECT count()", frozenset()),
    (f"SELECT * FROM {DB}.usage_daily", frozenset()),
    ("SELECT * FROM `usage_events` AS \"e\" WHERE e.tenant != ''", frozenset()),
    ("WITH t AS (SELECT 1), u AS MATERIALIZED (SELECT 2) SELECT * FROM t, u", frozenset({"t", "u"})),
    ("SELECT * FROM usage_events AS a, usage_daily AS b, numbers(2)", frozenset()),
    (
        (
            "SELECT extract(DAY FROM ts), substring(s FROM 2 FOR 3), trim(BOTH 'x' FROM s), "
            "overlay(s PLACING 'y' FROM 1) FROM usage_events"
        ),
        frozenset(),
    ),
    ("SELECT position('a' IN project), a IS NOT DISTINCT FROM b, a IS DISTINCT FROM b FROM usage_events", frozenset()),
    ("SELECT x FROM usage_events ARRAY JOIN tags.keys AS x, tags.values AS y", frozenset()),
    ("WITH [1, 2] AS allowed SELECT 1 IN allowed", frozenset()),
    ("SELECT * FROM (SELECT 1 AS x) AS s WHERE 1 IN s", frozenset()),
    ("SELECT t.1 FROM (SELECT (1, 2) AS t)", frozenset()),
    ("SELECT 'FROM system.tables', $$ system.tables $$, \"system\" FROM usage_events", frozenset()),
    ("SELECT 1;", frozenset()),
    ("SELECT format('{} {}', project, agent) FROM usage_events", frozenset()),
    ("SELECT in(project, ('a', 'b')), project IN ('a') FROM usage_events AS e", frozenset()),
]


@pytest.mark.parametrize("sql, ctes", ALLOWED)
def test_ordinary_statements_pass(sql, ctes):
    assert check_text(sql, DB, RAW) == ctes


REFUSED = [
    # (statement, reason)
    ("", "statement"),
    ("-- only a comment", "statement"),
    ("EXPLAIN SELECT 1", "statement"),
    ("SELECT 1; SELECT 2", "statement"),
    ("SELECT * FROM spendstream.usage_events", "table"),
    ("SELECT * FROM usage_events, spendstream.api_keys", "table"),
    ("SELECT * FROM usage_events AS a, (SELECT 1) AS b, spendstream.api_keys", "table"),
    ("SELECT * FROM usage_events AS e LEFT ANY JOIN spendstream.api_keys AS k USING tenant", "table"),
    ("SELECT * FROM api_keys", "table"),
    ("SELECT * FROM current_tenant", "table"),
    ("WITH current_tenant AS (SELECT 1) SELECT * FROM current_tenant", "table"),
    (f"SELECT * FROM {DB}.current_tenant", "table"),
    ("SELECT * FROM `spendstream`.`api_keys`", "table"),
    ("SELECT * FROM `usage\\_events`", "table"),  # escapes: whatever ClickHouse makes of them, not a view
    ("SELECT * FROM a.b.c", "table"),
    ("SELECT * FROM (spendstream.api_keys)", "table"),
    ("SELECT 1 WHERE 'x' IN spendstream.api_keys", "table"),
    ("SELECT 1 WHERE 'x' NOT IN (spendstream.api_keys)", "table"),
    ("SELECT 1 WHERE 'x' IN current_tenant", "table"),
    ("SELECT 1 WHERE 'x' IN (spendstream.api_keys AS k)", "table"),
    ("SELECT 1 WHERE 'x' IN (spendstream.api_keys k)", "table"),
    ("SELECT in('x', spendstream.api_keys)", "table"),
    ("SELECT globalNotIn('x', (spendstream.api_keys))", "table"),
    ("SELECT 1 WHERE 'x' IN url('http://x', 'CSV', 'a String')", "table_function"),
    ("SELECT * FROM url('http://x')", "table_function"),
    ("SELECT * FROM zeros(3)", "table_function"),
    ("SELECT * FROM db.numbers(3)", "table_function"),
    ("SELECT dictGetOrDefault('d', 'a', 1, 'x')", "function"),
    ("SELECT JOINGET('t', 'a', 1)", "function"),
    ("SELECT sleepEachRow(1) FROM usage_events", "function"),
    ("SELECT getMacro('shard')", "function"),
    ("SELECT __getScalar('x')", "function"),
    ("SELECT system.one.dummy", "table"),
    ("SELECT INFORMATION_SCHEMA.tables.table_name", "table"),
    ("SELECT spendstream.api_keys.key_hash FROM usage_events", "table"),
    ("SELECT * FROM usage_events SETTINGS log_comment = 'x'", "clause"),
    ("SELECT * FROM usage_events INTO OUTFILE 'x.csv'", "clause"),
    # EXISTS( looks like a call, yet its SELECT makes FROM a table again
    ("SELECT 1 WHERE EXISTS (SELECT 1 FROM spendstream.api_keys)", "table"),
    ("SELECT extract(DAY FROM (SELECT max(ts) FROM spendstream.api_keys))", "table"),
    # only POSITION(a IN b)'s own IN is no table: ClickHouse reads these as IN a table
    ("SELECT position(1 IN (SELECT 1) IN secret.t)", "table"),
    ("SELECT position('a', 1 IN secret.t)", "table"),
]


@pytest.mark.parametrize("sql, reason", REFUSED)
def test_reaching_outside_the_views_is_refused(sql, reason):
    with pytest.raises(QueryRefused) as err:
        check_text(sql, DB, RAW)
    assert err.value.reason == reason, err.value.message
    assert err.value.field == "sql"


def test_the_refusal_names_what_is_available():
    with pytest.raises(QueryRefused) as err:
        check_text("SELECT * FROM spendstream.api_keys", DB, RAW)
    assert err.value.message.startswith("table spendstream.api_keys is not available (statement refused)")
    assert "usage_daily" in err.value.message


def ast(text: str) -> list[str]:
    return text.strip("\n").splitlines()


IN_TREE = """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Literal UInt64_1
   Function in (children 1)
    ExpressionList (children 2)
     Literal 'x'
     {right}
"""


@pytest.mark.parametrize(
    "right, allowed",
    [
        ("Identifier usage_events", True),
        (f"Identifier {DB}.usage_events", True),
        ("Identifier recent", True),  # a CTE, or an alias
        ("Literal Tuple_('a', 'b')", True),
        ("Function tuple (children 1)", True),
        ("Identifier spendstream.api_keys", False),
        ("Identifier current_tenant", False),
        ("Function url (children 1)", False),
        ("Function remoteSecure (children 1)", False),
    ],
)
def test_the_syntax_tree_check_reads_the_right_side_of_in_as_a_table(right, allowed):
    lines = ast(IN_TREE.format(right=right))
    if allowed:
        check_ast(lines, DB, frozenset({"recent"}), RAW)
    else:
        with pytest.raises(QueryRefused):
            check_ast(lines, DB, frozenset({"recent"}), RAW)


FROM_TREE = """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Identifier {column}
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier {table}
"""


def test_the_syntax_tree_check_knows_ctes_and_other_databases():
    check_ast(ast(FROM_TREE.format(column="x", table="recent")), DB, frozenset({"recent"}), RAW)
    for column, table in (("x", "recent"), ("x", "api_keys"), ("spendstream.api_keys.id", "usage_events")):
        with pytest.raises(QueryRefused):
            check_ast(ast(FROM_TREE.format(column=column, table=table)), DB, frozenset(), RAW)


def test_query_tree_passes_array_join_headings():
    check_query_tree(
        ast(f"""
QUERY id: 0
  JOIN TREE
    ARRAY_JOIN id: 4, is_left: 0
      TABLE EXPRESSION
        TABLE id: 3, alias: __table1, table_name: {DB}.usage_events
"""),
        DB,
    )


def test_analysis_errors_keep_only_the_name_and_the_analysts_own_words():
    sql = "SELECT ünïcode, missing FROM usage_events"
    message = "Unknown expression identifier `missing` in scope SELECT ... FROM spendstream.usage_events. Maybe you meant: ['x']. (UNKNOWN_IDENTIFIER)"
    assert (
        analysis_error("UNKNOWN_IDENTIFIER", message, sql) == "unknown column or alias `missing` (UNKNOWN_IDENTIFIER)"
    )
    # a name the analyst did not write is not repeated
    message = "Unknown table expression identifier `spendstream.secret` in scope (UNKNOWN_TABLE)"
    assert analysis_error("UNKNOWN_TABLE", message, sql) == "unknown table (UNKNOWN_TABLE)"
    assert (
        analysis_error("SOMETHING_NEW", "Columns: a, b, c", sql)
        == "ClickHouse cannot run this statement (SOMETHING_NEW)"
    )
    # ClickHouse counts bytes: byte 19 is the 17th character here (ü and ï take two bytes)
    assert analysis_error("SYNTAX_ERROR", "Syntax error: failed at position 19 (missing)", sql) == (
        "syntax error at position 17 (near 'missing FROM usage_events')"
    )


def test_result_settings_truncate_only_when_asked():
    limits = QueryApiSettings(sql_max_rows=100)
    assert result_settings(None, limits) == ({"max_result_rows": 100}, 100)
    assert result_settings(10, limits) == ({"limit": 11, "max_result_rows": 11}, 10)
    assert result_settings(1000, limits) == ({"limit": 101, "max_result_rows": 101}, 100)


def test_tenant_slots_cap_each_tenant_on_its_own():
    slots = TenantSlots(limit=2)
    with slots.hold("a"), slots.hold("a"), slots.hold("b"):
        with pytest.raises(TooManyQueries) as err, slots.hold("a"):
            pass
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"} and err.value.field == "sql"
    with slots.hold("a"), slots.hold("a"):
        pass  # all released, also after the refusal
    assert slots._running == {}
