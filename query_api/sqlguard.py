"""What an analyst's statement may touch, decided before ClickHouse evaluates any of it. Pure.

POST /v1/sql checks a statement in four steps (see ``routers/sql.py``); nothing outside the tenant
views is evaluated at any of them:

1. ``check_text`` (here, before anything is sent to ClickHouse): a tokenizer that follows
   ClickHouse's own lexer (quoted names, backticks, strings, heredocs, nested comments) finds every
   place the statement names a table: after FROM / JOIN / a comma of the FROM list, on the right of
   IN, inside scalar subqueries and EXISTS. Each must be a tenant view (or a CTE of the statement),
   table functions there must read nothing (``SAFE_TABLE_FUNCTIONS``), and functions that read
   outside the query's tables (dictionaries, joinGet, file, ...) are refused anywhere, as are other
   databases (system, INFORMATION_SCHEMA, the raw tables' database), several statements, SETTINGS
   and INTO OUTFILE. Most hostile statements end here, and ClickHouse never sees them.
2. ``formatQuerySingleLine({sql:String})``: the statement is bound as data and ClickHouse's parser
   returns its canonical single-line text (comments gone, one statement); ``check_text`` runs again
   on it, and only that text is used from here on. Parsing evaluates nothing.
3. ``EXPLAIN AST <canonical>``: the unresolved syntax tree, checked by ``check_ast``: a SELECT only,
   no SETTINGS/FORMAT/INTO OUTFILE, every table (also the right side of IN) a tenant view or a CTE,
   only harmless table functions and functions. Also evaluates nothing.
4. ``EXPLAIN QUERY TREE <canonical>``, run like the statement itself (tenant views database, tenant
   in ``log_comment``, readonly, every resource limit): ClickHouse's analyzer evaluates constant
   scalar subqueries and EXISTS here, which steps 1-3 confined to the tenant views.
   ``check_query_tree`` then checks the resolved tree once more: every table it reads is a view in
   the tenant database.

Steps 1 and 3 are deliberately redundant: the tokenizer cannot be fooled by anything the parser
reads differently without step 3 seeing ClickHouse's own reading, and step 3 never runs on a
statement step 1 could already refuse, so the common attacks cost ClickHouse nothing.

Then the statement runs with database = the tenant views, log_comment = the key's tenant and
readonly = 1, which makes ClickHouse refuse any write or settings change, and the views filter
every row by that tenant. The checks here stop a statement from reaching around the views.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from query_api.errors import QueryRefused
from spendstream import aggregates

#: Tenant-scoped views analysts may read (created by clickhouse/schema/0006_tenant_views.sql and the
#: files adding aggregates), as the registry of aggregate tables lists them.
TENANT_VIEWS: frozenset[str] = aggregates.TENANT_VIEWS
#: Objects of the tenant views' database that are not for analysts; a CTE may not take their name
#: either, as a reference outside the CTE's scope would reach the object itself.
TENANT_DB_INTERNALS: frozenset[str] = frozenset({"current_tenant"})
#: Table functions that generate rows and read nothing (and that ClickHouse allows under readonly=1,
#: which zeros() for one is not).
SAFE_TABLE_FUNCTIONS: frozenset[str] = frozenset(
    {"numbers", "numbers_mt", "generate_series", "generateseries", "values"}
)
#: Every table function of ClickHouse 26.9 (``system.table_functions``, lower case): on the right
#: of IN these would be read as tables, so there only the safe ones pass.
TABLE_FUNCTIONS: frozenset[str] = frozenset(
    {
        "arrowstream",
        "azureblobstorage",
        "azureblobstoragecluster",
        "bigquery",
        "cluster",
        "clusterallreplicas",
        "cosn",
        "deltalake",
        "deltalakeazure",
        "deltalakeazurecluster",
        "deltalakecluster",
        "deltalakelocal",
        "deltalakes3",
        "deltalakes3cluster",
        "dictionary",
        "eval",
        "executable",
        "file",
        "filecluster",
        "filesystem",
        "format",
        "fuzzjson",
        "fuzzquery",
        "gcs",
        "generate_series",
        "generaterandom",
        "generateseries",
        "hdfs",
        "hdfscluster",
        "hudi",
        "hudicluster",
        "iceberg",
        "icebergazure",
        "icebergazurecluster",
        "icebergcluster",
        "iceberghdfs",
        "iceberghdfscluster",
        "iceberglocal",
        "iceberglocalcluster",
        "icebergs3",
        "icebergs3cluster",
        "input",
        "jdbc",
        "loop",
        "merge",
        "mergetreeanalyzeindexes",
        "mergetreeanalyzeindexesuuid",
        "mergetreecodecblockcounts",
        "mergetreeindex",
        "mergetreeprojection",
        "mergetreetextindex",
        "mongodb",
        "mysql",
        "null",
        "numbers",
        "numbers_mt",
        "odbc",
        "oss",
        "paimon",
        "paimonazure",
        "paimonazurecluster",
        "paimoncluster",
        "paimonhdfs",
        "paimonhdfscluster",
        "paimonlocal",
        "paimons3",
        "paimons3cluster",
        "postgresql",
        "primes",
        "prometheusquery",
        "prometheusqueryrange",
        "python",
        "redis",
        "remote",
        "remotesecure",
        "s3",
        "s3cluster",
        "sqlite",
        "sqlstandardvalues",
        "timeseriesdata",
        "timeseriesmetricfamilies",
        "timeseriesmetrics",
        "timeseriessamples",
        "timeseriesselector",
        "timeseriestags",
        "url",
        "urlcluster",
        "values",
        "view",
        "viewexplain",
        "viewifpermitted",
        "ytsaurus",
        "zeros",
        "zeros_mt",
    }
)
#: Functions that read data or files outside the tables of the query, or stall a worker.
#: Compared case-insensitively; names starting with "dict" are all dictionary access, and those
#: starting with "__" are the analyzer's own (e.g. __getScalar), not meant to be called.
FORBIDDEN_FUNCTIONS: frozenset[str] = frozenset(
    {
        "joinget",
        "joingetornull",
        "file",
        "catboostevaluate",
        "naivebayesclassifier",
        "hascolumnintable",
        "sleep",
        "sleepeachrow",
        "getserversetting",
        "getmergetreesetting",
        "addresstoline",
        "addresstolinewithinlines",
        "addresstosymbol",
        "demangle",
        "getclienthttpheader",
        "filesystemcapacity",
        "filesystemavailable",
        "filesystemunreserved",
        "getsubcolumn",
        "getmacro",
    }
)
#: Databases no statement may name, whatever the position (compared case-insensitively; the
#: router adds the raw tables' database).
SYSTEM_DATABASES: frozenset[str] = frozenset({"system", "information_schema", "default"})
#: The IN operators of the syntax tree: their right side is read as a table when it is a name.
_IN_FUNCTIONS = frozenset(
    {"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin", "globalnotnullin"}
)
_STATEMENT_ROOTS = ("SelectWithUnionQuery",)
#: what ClickHouse reads for a SELECT without FROM: one row, one constant column
_NO_TABLE = "system.one"


def _refuse(reason: str, message: str) -> QueryRefused:
    return QueryRefused(message, reason)


def _not_available(name: str) -> QueryRefused:
    return _refuse(
        "table",
        f"table {name} is not available (statement refused): only the tenant views can be queried: "
        f"{', '.join(sorted(TENANT_VIEWS))}",
    )


def _is_forbidden_function(name: str) -> bool:
    """For the analyst's own text and syntax tree."""
    return name.startswith("__") or _reads_elsewhere(name)


def _reads_elsewhere(name: str) -> bool:
    """For the analyzer's tree too, where its own __functions appear."""
    lowered = name.lower()
    return lowered.startswith("dict") or lowered in FORBIDDEN_FUNCTIONS


# --------------------------------------------------------------------------------------------
# Step 1: the statement's text, tokenized like ClickHouse's lexer (src/Parsers/Lexer.cpp)
# --------------------------------------------------------------------------------------------

WORD, QUOTED, STRING, NUMBER, PUNCT, OTHER = "word", "quoted", "string", "number", "punct", "other"
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_ASCII_SPACE = frozenset(" \t\n\r\f\v")
_PUNCTUATION = frozenset("()[]{},;.")
#: tokens after which a '.' is a qualifier or tuple access rather than the start of a number
_DOT_AFTER = frozenset({WORD, QUOTED, NUMBER, ")", "]"})


@dataclass(frozen=True)
class Token:
    kind: str  # WORD, QUOTED (a quoted name), STRING, NUMBER, PUNCT, OTHER
    text: str  # WORD: as written; QUOTED: the name; PUNCT/OTHER: the character
    start: int  # offset in the statement (characters)
    escaped: bool = False  # a quoted name written with backslashes or doubled quotes

    def is_word(self, *words: str) -> bool:
        return self.kind == WORD and self.text.upper() in words

    @property
    def is_name(self) -> bool:
        return self.kind in (WORD, QUOTED)

    def is_punct(self, char: str) -> bool:
        return self.kind == PUNCT and self.text == char


def _syntax(message: str, at: int) -> QueryRefused:
    return _refuse("syntax", f"syntax error at position {at + 1}: {message}")


def tokenize(sql: str) -> list[Token]:
    """The significant tokens of ``sql`` (comments and whitespace dropped), linear in its length.

    Where the tokenizer and ClickHouse could disagree, it errs towards seeing more: any non-ASCII
    character outside quotes counts as whitespace (ClickHouse skips Unicode spaces and refuses
    anything else), so a name can never hide from the checks behind one.
    """
    tokens: list[Token] = []
    i, n = 0, len(sql)
    previous = ""  # kind of the previous significant token, or ")" / "]"
    while i < n:
        ch = sql[i]
        start = i
        if ch in _ASCII_SPACE or ord(ch) > 127:
            i += 1
            continue
        if sql.startswith(("--", "//"), i) or (ch == "#" and sql[i + 1 : i + 2] in (" ", "!")):
            end = sql.find("\n", i)
            i = n if end == -1 else end
            continue
        if sql.startswith("/*", i):
            i = _block_comment_end(sql, i)
            continue
        if ch in "'\"`":
            i, value, escaped = _quoted(sql, i)
            token = Token(STRING if ch == "'" else QUOTED, value, start, escaped)
        elif ch == "$" and (heredoc := _heredoc_end(sql, i)):
            i = heredoc
            token = Token(STRING, sql[start:i], start)
        elif ch in "xXbB" and i + 2 < n and sql[i + 1] == "'":
            i = _hex_or_bin_string_end(sql, i)
            token = Token(STRING, sql[start:i], start)
        elif ch in _DIGITS:
            i = _digits_end(sql, i) if previous == "." else _number_end(sql, i)
            kind = NUMBER
            if i < n and sql[i] in _WORD_CHARS:  # 1st_name: ClickHouse reads a bare word
                while i < n and (sql[i] in _WORD_CHARS or sql[i] == "$"):
                    i += 1
                kind = WORD
            token = Token(kind, sql[start:i], start)
        elif ch == "." and not (i > 0 and (sql[i + 1 : i + 2] not in _DIGITS or previous in _DOT_AFTER)):
            i = _digits_end(sql, i + 1)  # a number such as .5e3
            if i + 1 < n and sql[i] in "eE":
                i = _exponent_end(sql, i)
            token = Token(NUMBER, sql[start:i], start)
        elif ch in _WORD_CHARS or ch == "$":
            i += 1
            while i < n and (sql[i] in _WORD_CHARS or sql[i] == "$"):
                i += 1
            token = Token(WORD, sql[start:i], start)
        elif ch in _PUNCTUATION:
            i += 1
            token = Token(PUNCT, ch, start)
        else:
            i += 1
            token = Token(OTHER, ch, start)
        tokens.append(token)
        previous = token.text if token.kind == PUNCT else token.kind
    return tokens


def _block_comment_end(sql: str, start: int) -> int:
    nesting, i = 0, start
    while i < len(sql) - 1:
        if sql.startswith("/*", i):
            nesting += 1
            i += 2
        elif sql.startswith("*/", i):
            nesting -= 1
            i += 2
            if nesting == 0:
                return i
        else:
            i += 1
    raise _syntax("a /* comment is not closed", start)


def _quoted(sql: str, start: int) -> tuple[int, str, bool]:
    """(end, value, escaped) of the quoted string or name at ``start``; escapes kept as written."""
    quote, i, n = sql[start], start + 1, len(sql)
    parts: list[str] = []
    escaped = False
    while i < n:
        ch = sql[i]
        if ch == "\\":
            escaped = True
            parts.append(sql[i + 1 : i + 2])
            i += 2
        elif ch == quote:
            if sql[i + 1 : i + 2] == quote:
                escaped = True
                parts.append(quote)
                i += 2
            else:
                return i + 1, "".join(parts), escaped
        else:
            parts.append(ch)
            i += 1
    what = {"'": "string", '"': "double-quoted name", "`": "back-quoted name"}[quote]
    raise _syntax(f"a {what} is not closed", start)


def _heredoc_end(sql: str, start: int) -> int | None:
    """End of ``$tag$ ... $tag$`` at ``start`` (a string to ClickHouse), or None."""
    tag_end = sql.find("$", start + 1)
    if tag_end == -1:
        return None
    tag = sql[start : tag_end + 1]
    close = sql.find(tag, tag_end + 1)
    return None if close == -1 else close + len(tag)


def _hex_or_bin_string_end(sql: str, start: int) -> int:
    digits = _HEX_DIGITS if sql[start] in "xX" else frozenset("01")
    i = start + 2
    while i < len(sql) and sql[i] in digits:
        i += 1
    if i >= len(sql) or sql[i] != "'":
        raise _syntax("a hexadecimal or binary string is not closed", start)
    return i + 1


def _digits_end(sql: str, i: int) -> int:
    """After a dot: tuple access (t.1.2) reads plain digits only."""
    while i < len(sql) and (sql[i] in _DIGITS or sql[i] == "_"):
        i += 1
    return i


def _number_end(sql: str, i: int) -> int:
    n = len(sql)
    digits = _DIGITS
    if sql[i] == "0" and i + 2 < n and sql[i + 1] in "xXbB":
        if sql[i + 1] in "xX" and sql[i + 2] in _HEX_DIGITS:
            digits, i = _HEX_DIGITS, i + 2
        elif sql[i + 2] in "01":
            digits, i = frozenset("01"), i + 2
    while i < n and (sql[i] in digits or sql[i] == "_"):
        i += 1
    if i < n and sql[i] == ".":
        i += 1
        while i < n and (sql[i] in digits or sql[i] == "_"):
            i += 1
    if i + 1 < n and sql[i] in ("pP" if digits is _HEX_DIGITS else "eE"):
        i = _exponent_end(sql, i)
    return i


def _exponent_end(sql: str, i: int) -> int:
    i += 1
    if i + 1 < len(sql) and sql[i] in "+-":
        i += 1
    while i < len(sql) and (sql[i] in _DIGITS or sql[i] == "_"):
        i += 1
    return i


@dataclass
class _Group:
    """One bracket level of the statement: what opened it and which clause it is in."""

    call: str  # the function whose arguments these are (lower case), or ""
    has_select: bool = False
    clause: str = ""
    commas: int = 0
    froms: int = 0
    ins: int = 0


#: functions whose arguments may say FROM (EXTRACT(DAY FROM t), TRIM(BOTH 'x' FROM s), ...) or IN
#: (POSITION(a IN b)) without naming a table: once, before any comma; any other FROM or IN there is
#: read as ClickHouse would read it elsewhere
_FROM_IN_ARGUMENTS = frozenset({"extract", "substring", "trim", "overlay"})
_IN_IN_ARGUMENTS = frozenset({"position"})
_CLAUSES = frozenset(
    {
        "SELECT",
        "FROM",
        "WHERE",
        "PREWHERE",
        "GROUP",
        "HAVING",
        "ORDER",
        "LIMIT",
        "OFFSET",
        "WINDOW",
        "QUALIFY",
        "ON",
        "USING",
        "UNION",
        "EXCEPT",
        "INTERSECT",
        "SETTINGS",
        "FORMAT",
        "WITH",
        "SAMPLE",
        "INTO",
    }
)
_STATEMENT_STARTS = frozenset({"SELECT", "WITH", "FROM"})


def check_text(sql: str, tenant_db: str, foreign_databases: frozenset[str] = frozenset()) -> frozenset[str]:
    """Refuse a statement whose text names anything outside the tenant views; returns its CTE names.

    ``foreign_databases`` are refused as qualifiers anywhere, next to ``SYSTEM_DATABASES``.
    """
    tokens = tokenize(sql)
    if not tokens:
        raise _refuse("statement", "empty statement")
    for at, token in enumerate(tokens):
        if token.is_punct(";") and at != len(tokens) - 1:
            raise _refuse("statement", "Multi-statements are not allowed: send one statement per request")
    if tokens[-1].is_punct(";"):
        tokens.pop()
    first = tokens[0] if tokens else None
    if first is None or not (first.is_punct("(") or first.is_word(*_STATEMENT_STARTS)):
        got = first.text.upper()[:32] if first is not None else "an empty statement"
        raise _refuse("statement", f"only SELECT statements are allowed (got {got})")
    ctes = _cte_names(tokens)
    _TextCheck(tokens, tenant_db, ctes, SYSTEM_DATABASES | {d.lower() for d in foreign_databases}).run()
    return ctes


def cte_names(sql: str) -> frozenset[str]:
    """The names ``sql`` defines as ``name AS (subquery)``, which ``check_ast`` needs (the syntax tree
    does not print them)."""
    return _cte_names(tokenize(sql))


def _cte_names(tokens: list[Token]) -> frozenset[str]:
    names = []
    for at in range(len(tokens) - 2):
        name, keyword, after = tokens[at], tokens[at + 1], tokens[at + 2]
        if name.is_name and keyword.is_word("AS"):
            if after.is_word("MATERIALIZED") and at + 3 < len(tokens):
                after = tokens[at + 3]
            if after.is_punct("("):
                names.append(name.text)
    return frozenset(names)


def _special_argument(group: _Group, seen: int) -> bool:
    return not group.has_select and seen == 1 and not group.commas


class _TextCheck:
    """Walks the tokens once, keeping the bracket groups, and checks each name where it stands."""

    def __init__(self, tokens: list[Token], tenant_db: str, ctes: frozenset[str], foreign: frozenset[str]):
        self.tokens = tokens
        self.tenant_db = tenant_db
        self.ctes = ctes
        self.foreign = foreign
        self.groups = [_Group(call="")]

    def run(self) -> None:
        tokens = self.tokens
        at = 0
        while at < len(tokens):
            token = tokens[at]
            previous = tokens[at - 1] if at else None
            if token.kind == PUNCT and token.text in "([{":
                call = previous.text.lower() if previous is not None and previous.kind == WORD else ""
                self.groups.append(_Group(call=call))
            elif token.kind == PUNCT and token.text in ")]}":
                if len(self.groups) > 1:
                    self.groups.pop()
            elif token.is_punct(","):
                self.groups[-1].commas += 1
            elif token.is_name and not (previous is not None and previous.is_punct(".")):
                at = self._name(at)
                continue
            at += 1

    def _name(self, at: int) -> int:
        """Check the (possibly qualified) name starting at ``at``; returns the index after it."""
        tokens = self.tokens
        parts = [tokens[at]]
        end = at + 1
        while end + 1 < len(tokens) and tokens[end].is_punct(".") and tokens[end + 1].is_name:
            parts.append(tokens[end + 1])
            end += 2
        called = end < len(tokens) and tokens[end].is_punct("(")
        name = ".".join(p.text for p in parts)
        position = self._position(at, end)
        if position == "table" and called:
            if len(parts) != 1 or name.lower() not in SAFE_TABLE_FUNCTIONS:
                raise _refuse(
                    "table_function",
                    f"table function {name}() is not allowed (allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))})",
                )
        elif position == "in" and called:
            if name.lower() in TABLE_FUNCTIONS and name.lower() not in SAFE_TABLE_FUNCTIONS:
                raise _refuse("table_function", f"table function {name}() is not allowed")
        elif position is not None:
            self._table(parts, position)
        if called and position != "table" and _is_forbidden_function(parts[-1].text):
            raise _refuse("function", f"function {name}() is not allowed: it reads data outside the tenant views")
        if len(parts) > 1 and parts[0].text.lower() in self.foreign:
            raise _not_available(name)
        if len(parts) == 1 and parts[0].kind == WORD and position is None:
            self._keyword(at)
        return end

    def _keyword(self, at: int) -> None:
        group = self.groups[-1]
        word = self.tokens[at].text.upper()
        following = self.tokens[at + 1] if at + 1 < len(self.tokens) else None
        if word == "SETTINGS":
            raise _refuse("clause", "SETTINGS clauses are not allowed")
        if word == "INTO" and following is not None and following.is_word("OUTFILE"):
            raise _refuse("clause", "INTO OUTFILE clauses are not allowed; choose the format with the request")
        if word == "SELECT":
            group.has_select = True
        elif word == "IN":
            group.ins += 1
        elif word == "FROM":
            group.froms += 1
        if word == "JOIN":
            group.clause = "ARRAY JOIN" if at and self.tokens[at - 1].is_word("ARRAY") else "FROM"
        elif word == "FROM":
            if not self._from_is_an_operator(at, group):
                group.clause = "FROM"
        elif word in _CLAUSES:
            group.clause = word

    def _from_is_an_operator(self, at: int, group: _Group) -> bool:
        tokens = self.tokens
        if group.call in _FROM_IN_ARGUMENTS and _special_argument(group, group.froms):
            return True
        # a IS [NOT] DISTINCT FROM b
        return at >= 2 and tokens[at - 1].is_word("DISTINCT") and tokens[at - 2].is_word("IS", "NOT")

    def _position(self, at: int, end: int) -> str | None:
        """'table' where the name is read as a table (FROM/JOIN), 'in' on the right of IN, else None."""
        tokens = self.tokens
        group = self.groups[-1]
        if at >= 2 and tokens[at - 1].is_punct("(") and self._alone_in_parentheses(end):
            # a parenthesised single name, as in the canonical `x IN (db.t)` or `x IN (db.t AS a)`:
            # the parenthesis stands where the name would, in the group around it
            at -= 1
            group = self.groups[-2] if len(self.groups) > 1 else group
        before = tokens[at - 1] if at else None
        if before is None:
            return None
        if before.is_word("FROM") and not self._from_is_an_operator(at - 1, group):
            return "table"
        if before.is_word("JOIN") and not (at >= 2 and tokens[at - 2].is_word("ARRAY")):
            return "table"
        if before.is_punct(",") and group.clause == "FROM":
            return "table"
        if before.is_word("IN") and not (group.call in _IN_IN_ARGUMENTS and _special_argument(group, group.ins)):
            return "in"
        if before.is_punct(",") and group.call in _IN_FUNCTIONS and group.commas == 1:
            return "in"  # in(x, db.t): the operator written as a function
        return None

    def _alone_in_parentheses(self, end: int) -> bool:
        """The name ending before ``end`` closes its parenthesis, maybe after an alias."""
        tokens = self.tokens
        if end < len(tokens) and tokens[end].is_word("AS"):
            end += 1
        if end < len(tokens) and tokens[end].is_name and end + 1 < len(tokens) and tokens[end + 1].is_punct(")"):
            end += 1
        return end < len(tokens) and tokens[end].is_punct(")")

    def _table(self, parts: list[Token], position: str) -> None:
        name = ".".join(p.text for p in parts)
        if any(p.escaped for p in parts) or len(parts) > 2:
            raise _not_available(name)
        if len(parts) == 2:
            if parts[0].text != self.tenant_db or parts[1].text not in TENANT_VIEWS:
                raise _not_available(name)
            return
        table = parts[0].text
        if table in TENANT_VIEWS or (table in self.ctes and table not in TENANT_DB_INTERNALS):
            return
        # on the right of IN a single name may also be an alias; it resolves in the tenant views'
        # database all the same, where only the internals are off limits
        if position == "table" or table in TENANT_DB_INTERNALS:
            raise _not_available(table)


# --------------------------------------------------------------------------------------------
# Steps 3 and 4: ClickHouse's own trees
# --------------------------------------------------------------------------------------------


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


def check_ast(
    lines: list[str],
    tenant_db: str,
    ctes: frozenset[str] = frozenset(),
    foreign_databases: frozenset[str] = frozenset(),
) -> None:
    """Refuse a statement whose syntax tree reaches outside the tenant views (see module doc).

    ``ctes``: the statement's CTE names (``check_text`` finds them; the tree does not print them).
    """
    nodes = parse_explain(lines)
    if not nodes:
        raise _refuse("statement", "empty statement")
    root = nodes[0]
    if not root.kind.isidentifier():
        # EXPLAIN AST answers in TabSeparated, one node name per line, unless the statement's own
        # FORMAT clause chose another output format for it (an INSERT's canonical text has one too)
        raise _refuse(
            "clause",
            "only SELECT statements are allowed, without FORMAT, INTO OUTFILE or SETTINGS clauses; "
            "choose the format with the request",
        )
    if root.kind not in _STATEMENT_ROOTS:
        raise _refuse(
            "statement",
            f"only SELECT statements are allowed (got {root.kind.removesuffix('Query') or 'an empty statement'})",
        )
    # the root's children are the union list, then FORMAT / INTO OUTFILE / SETTINGS when present
    if sum(1 for n in nodes if n.depth == root.depth + 1) != 1:
        raise _refuse(
            "clause", "FORMAT, INTO OUTFILE and SETTINGS clauses are not allowed; choose the format with the request"
        )
    foreign = SYSTEM_DATABASES | {d.lower() for d in foreign_databases}
    for i, node in enumerate(nodes):
        if node.kind == "Set":
            raise _refuse("clause", "SETTINGS clauses are not allowed")
        if node.kind == "TableIdentifier":
            _check_tree_table(_name(node.text), tenant_db, ctes, in_operator=False)
        elif node.kind == "Identifier":
            name = _name(node.text)
            if "." in name and name.split(".", 1)[0].lower() in foreign:
                raise _not_available(name)
        elif node.kind == "Function":
            name = _name(node.text)
            if _is_table_function(nodes, i):
                if name.lower() not in SAFE_TABLE_FUNCTIONS:
                    raise _refuse(
                        "table_function",
                        f"table function {name}() is not allowed (allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))})",
                    )
            elif _is_forbidden_function(name):
                raise _refuse("function", f"function {name}() is not allowed: it reads data outside the tenant views")
            elif name.lower() in _IN_FUNCTIONS:
                _check_in_operand(nodes, i, tenant_db, ctes)


def _check_tree_table(name: str, tenant_db: str, ctes: frozenset[str], *, in_operator: bool) -> None:
    # The tree prints `db`.`t` and `db.t` alike: a name with a dot is read as qualified, which
    # refuses a back-quoted name holding a dot rather than letting one pass.
    if "." in name:
        if name != _NO_TABLE and not (name.startswith(f"{tenant_db}.") and name[len(tenant_db) + 1 :] in TENANT_VIEWS):
            raise _not_available(name)
    elif name in TENANT_DB_INTERNALS or not (in_operator or name in TENANT_VIEWS or name in ctes):
        raise _not_available(name)


def _check_in_operand(nodes: list[AstNode], index: int, tenant_db: str, ctes: frozenset[str]) -> None:
    """The right side of ``x IN y``: a name there is read as a table, so it must be one of the views."""
    operands = _children(nodes, index + 1) if index + 1 < len(nodes) else []
    if len(operands) != 2:
        return
    right = nodes[operands[1]]
    if right.kind == "Identifier":
        _check_tree_table(_name(right.text), tenant_db, ctes, in_operator=True)
    elif right.kind == "Function":
        name = _name(right.text).lower()
        if name in TABLE_FUNCTIONS and name not in SAFE_TABLE_FUNCTIONS:
            raise _refuse("table_function", f"table function {_name(right.text)}() is not allowed")


def _children(nodes: list[AstNode], index: int) -> list[int]:
    depth = nodes[index].depth
    children = []
    for j in range(index + 1, len(nodes)):
        if nodes[j].depth <= depth:
            break
        if nodes[j].depth == depth + 1:
            children.append(j)
    return children


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
    return text[at + len(marker) :]


def check_query_tree(lines: list[str], tenant_db: str) -> None:
    """Refuse unless every table the analyzer resolved is a tenant view (see module doc)."""
    for node in parse_explain(lines):
        if node.kind == "TABLE" and node.text.startswith("id: "):  # not the "TABLE EXPRESSION" heading of ARRAY JOIN
            value = _field(node.text, "table_name")
            if value is None or not _is_tenant_view(value, tenant_db):
                raise _refuse(
                    "table",
                    f"the statement reads {(value or '?').split(',')[0]!r}; only the tenant views "
                    f"({', '.join(sorted(TENANT_VIEWS))}) are available",
                )
        elif node.kind == "TABLE_FUNCTION":
            name = (_field(node.text, "table_function_name") or "?").split(",")[0]
            if name.lower() not in SAFE_TABLE_FUNCTIONS:
                raise _refuse("table_function", f"table function {name}() is not allowed")
        elif node.kind == "FUNCTION":
            name = (_field(node.text, "function_name") or "").split(",")[0]
            if _reads_elsewhere(name):
                raise _refuse("function", f"function {name}() is not allowed: it reads data outside the tenant views")


def _is_tenant_view(value: str, tenant_db: str) -> bool:
    prefix = f"{tenant_db}."
    if value.split(",", 1)[0] == _NO_TABLE:
        return True
    if not value.startswith(prefix):
        return False
    rest = value[len(prefix) :]
    table = rest.split(",", 1)[0]
    return table in TENANT_VIEWS


# --------------------------------------------------------------------------------------------
# What an analyst learns from ClickHouse's errors
# --------------------------------------------------------------------------------------------

#: Errors of the parse and analysis steps, explained in words of our own: ClickHouse's text there
#: can describe objects the statement could not see (a table's columns, a view's definition).
ANALYSIS_ERRORS: dict[str, str] = {
    "UNKNOWN_IDENTIFIER": "unknown column or alias",
    "UNKNOWN_FUNCTION": "unknown function",
    "UNKNOWN_AGGREGATE_FUNCTION": "unknown aggregate function",
    "UNKNOWN_TABLE": "unknown table",
    "UNKNOWN_DATABASE": "unknown database",
    "AMBIGUOUS_IDENTIFIER": "a name matches more than one column; qualify it with its table",
    "AMBIGUOUS_COLUMN_NAME": "a name matches more than one column; qualify it with its table",
    "MULTIPLE_EXPRESSIONS_FOR_ALIAS": "one alias names different expressions",
    "CYCLIC_ALIASES": "aliases refer to each other in a cycle",
    "ILLEGAL_TYPE_OF_ARGUMENT": "a function got an argument of a type it does not take",
    "NUMBER_OF_ARGUMENTS_DOESNT_MATCH": "a function got the wrong number of arguments",
    "TYPE_MISMATCH": "the types of two expressions do not match",
    "NO_COMMON_TYPE": "values of incompatible types are combined",
    "NOT_AN_AGGREGATE": "a column is neither inside an aggregate function nor in GROUP BY",
    "ILLEGAL_AGGREGATION": "an aggregate function is used where it is not allowed",
    "NUMBER_OF_COLUMNS_DOESNT_MATCH": "the two sides have different numbers of columns",
    "INCORRECT_RESULT_OF_SCALAR_SUBQUERY": "a scalar subquery returned more than one row",
    "BAD_ARGUMENTS": "a function got an argument value it does not take",
    "TOO_DEEP_AST": "the statement is nested too deeply",
    "TOO_BIG_AST": "the statement is too large",
    "TOO_DEEP_RECURSION": "the statement is nested too deeply",
    "SYNTAX_ERROR": "syntax error",
    "READONLY": "the statement needs more than read access",
}
_QUOTED_NAME = re.compile(r"`([^`]{1,128})`")
_POSITION = re.compile(r"failed at position (\d+)")


def analysis_error(name: str | None, message: str, sql: str) -> str:
    """A message for an error ClickHouse raised while parsing or analysing ``sql``.

    Only the error's name and our own explanation, plus what the analyst wrote themselves: the
    unknown name when it appears in their statement, the position of a syntax error with the
    text there.
    """
    if name == "SYNTAX_ERROR" and (at := _POSITION.search(message)):
        offset = _char_offset(sql, int(at.group(1)) - 1)
        near = sql[offset : offset + 30].split("\n", 1)[0]
        return f"syntax error at position {offset + 1}" + (f" (near {near!r})" if near else " (end of the statement)")
    explanation = ANALYSIS_ERRORS.get(name or "", "ClickHouse cannot run this statement")
    if name in ("UNKNOWN_IDENTIFIER", "UNKNOWN_FUNCTION", "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_TABLE"):
        quoted = _QUOTED_NAME.search(message)
        if quoted and quoted.group(1) in sql:
            explanation += f" `{quoted.group(1)}`"
    return f"{explanation} ({name or 'error'})"


def _char_offset(sql: str, byte_offset: int) -> int:
    """ClickHouse counts positions in UTF-8 bytes."""
    return len(sql.encode()[: max(byte_offset, 0)].decode("utf-8", "ignore"))
