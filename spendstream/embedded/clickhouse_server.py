"""Embedded ClickHouse: ClickHouse's HTTP interface served on top of chDB.

No ClickHouse server can be installed on the machines this project targets, yet every service
must talk to ClickHouse through clickhouse-connect exactly as in production. chDB runs the real
ClickHouse engine in-process; this module puts the HTTP protocol in front of it so that other
processes (clickhouse-connect sync and async clients, curl, any ClickHouse HTTP client) use it
unchanged. What clickhouse-connect sends and what chDB can and cannot do is measured in
EMBEDDED-STACK.md; anything this server cannot honour is answered with a ClickHouse-style error,
never silently approximated.

Shape:
- SQL scanning (pure): splits ``INSERT ... FORMAT x`` / ``VALUES`` statements from their data and
  finds a query's explicit output format, so data never passes through the SQL parser.
- Body codecs: request bodies may be a chain of compressed frames (clickhouse-connect sends every
  Native block as its own LZ4 frame), responses are compressed on request.
- Engine: one chDB connection per ClickHouse session, a fresh connection for every sessionless
  request (so no SET can leak into another request), all blocking engine work on worker threads.
  A request's settings, limits included, are SET on its connection; so is ``readonly``, which chDB
  enforces as a server does (writes, SET, SETTINGS clauses) except inside sessions, where it would
  outlive the request and is decided from the statement instead (see _refuse_readonly_in_session).
- HTTP: aiohttp's low-level server (no routing layer; the protocol has two paths).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import itertools
import json
import logging
import os
import re
import signal
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("spendstream.embedded.clickhouse")

USER_ENV = "SPENDSTREAM_EMBEDDED_CH_USER"
PASSWORD_ENV = "SPENDSTREAM_EMBEDDED_CH_PASSWORD"
DEFAULT_USER = "default"

# ClickHouse's own defaults for the HTTP interface.
MAX_QUERY_SIZE = 262_144  # setting max_query_size: longest query text outside insert data
DEFAULT_SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600
MAX_URI_BYTES = 1_048_576  # ClickHouse's http_max_uri_size: params and inserts travel in the URL

INSERT_BATCH_BYTES = 1 << 20  # body bytes (as sent, maybe compressed) per engine call; amortises thread hops
# Decoded insert data run as one query (see PendingInsert): that way costs about the same per insert
# up to here, but about twice the engine CPU per row for large inserts (75k-row sink inserts:
# ~11.8 vs ~5.5 µs per row), so larger inserts stream.
WHOLE_INSERT_MAX_BYTES = 1 << 20
WORKER_THREADS = 8
SHUTDOWN_GRACE_S = 10.0

# Request parameters that steer the HTTP exchange rather than the query. ClickHouse accepts them
# next to settings; chDB knows nothing of them, so passing them to SET would fail or do nothing.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "role",
        "buffer_size",
        "compress",
        "decompress",
        "wait_end_of_query",
        "client_protocol_version",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "http_native_compression_disable_checksumming_on_decompress",
        "add_http_cors_header",
        "stacktrace",
        # applied by Lease.prepare: once SET on a session, readonly could never be reset
        "readonly",
    }
)
# Formats whose per-block encodings concatenate into one valid stream; other formats (JSON,
# *WithNames, Arrow, ...) get a header or footer per engine chunk and are answered in one piece.
STREAMABLE_FORMATS = frozenset(
    {
        "Native",
        "RowBinary",
        "TabSeparated",
        "TSV",
        "TabSeparatedRaw",
        "TSVRaw",
        "CSV",
        "JSONEachRow",
        "JSONCompactEachRow",
    }
)
CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

ERROR_CODES = {
    "SYNTAX_ERROR": 62,
    "BAD_ARGUMENTS": 36,
    "NOT_IMPLEMENTED": 48,
    "UNKNOWN_COMPRESSION_METHOD": 89,
    "UNKNOWN_SETTING": 115,
    "READONLY": 164,
    "INTO_OUTFILE_NOT_ALLOWED": 358,
    "CANNOT_DECOMPRESS": 271,
    "SESSION_NOT_FOUND": 372,
    "SESSION_IS_LOCKED": 373,
    "AUTHENTICATION_FAILED": 516,
    "UNEXPECTED_END_OF_FILE": 3,
    "STD_EXCEPTION": 1001,
}
# The subset of ClickHouse's exceptionCodeToHTTPStatus that clients and humans act on.
_HTTP_STATUS = {
    516: 401,
    192: 401,
    193: 401,
    194: 401,
    497: 403,
    164: 403,
    60: 404,
    81: 404,
    372: 404,
    48: 501,
    **dict.fromkeys((3, 6, 26, 27, 33, 36, 41, 43, 46, 47, 53, 62, 72, 73, 89, 115, 117, 271, 456), 400),
}
_ENGINE_ERROR = re.compile(r"Code: (\d+)\. (.*)", re.S)


class ClickHouseError(Exception):
    """An error reported to the client the way a ClickHouse server reports it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def named(cls, name: str, text: str) -> ClickHouseError:
        return cls(ERROR_CODES[name], f"DB::Exception: {text}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        text = str(exc)
        match = _ENGINE_ERROR.search(text)
        if match is None:
            return cls.named("STD_EXCEPTION", text or type(exc).__name__)
        return cls(int(match.group(1)), match.group(2).strip())

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    def body(self, version: str) -> str:
        message = self.message if "(version " in self.message else f"{self.message} (version {version})"
        return f"Code: {self.code}. {message}\n"


# --------------------------------------------------------------------------------------------
# SQL scanning (pure)
# --------------------------------------------------------------------------------------------


class _Incomplete(Exception):
    """The text ends inside a string, quoted name or comment."""


_SPACE = frozenset(b" \t\r\n\f\v")
_WORD_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_WORD_PART = _WORD_START | frozenset(b"0123456789$")
_QUOTES = frozenset(b"'\"`")


def _words(text: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (WORD, start, end, depth) for every bare word of SQL text, skipping literals and comments.

    Only bare words and bracket depth matter to the callers, so numbers and operators are skipped
    byte by byte. Raises _Incomplete when the text stops inside a literal or comment.
    """
    i, n, depth = 0, len(text), 0
    while i < n:
        ch = text[i]
        if ch in _SPACE:
            i += 1
        elif ch in _WORD_START:
            j = i + 1
            while j < n and text[j] in _WORD_PART:
                j += 1
            yield text[i:j].upper(), i, j, depth
            i = j
        elif ch in _QUOTES:
            i = _skip_quoted(text, i)
        elif text.startswith(b"--", i) or ch == 0x23:  # '#': ClickHouse also takes MySQL-style comments
            end = text.find(b"\n", i)
            if end < 0:
                raise _Incomplete
            i = end + 1
        elif text.startswith(b"/*", i):
            i = _skip_block_comment(text, i)
        elif ch in b"([":
            depth += 1
            i += 1
        elif ch in b")]":
            depth -= 1
            i += 1
        elif ch in b"0123456789":  # a number's letters (1e5, 0x1F) are not words
            i += 1
            while i < n and text[i] in _WORD_PART:
                i += 1
        else:
            i += 1


def _skip_quoted(text: bytes, start: int) -> int:
    quote, i, n = text[start], start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == 0x5C:  # backslash escapes the next byte
            i += 2
        elif ch == quote:
            if i + 1 < n and text[i + 1] == quote:  # doubled quote
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise _Incomplete


def _skip_block_comment(text: bytes, start: int) -> int:
    nesting, i, n = 0, start, len(text)
    while i < n:
        if text.startswith(b"/*", i):
            nesting += 1
            i += 2
        elif text.startswith(b"*/", i):
            nesting -= 1
            i += 2
            if nesting == 0:
                return i
        else:
            i += 1
    raise _Incomplete


@dataclass(frozen=True)
class InsertSplit:
    """An INSERT whose data follows its statement: ``statement`` excludes the FORMAT/VALUES clause."""

    statement: str
    format: str
    data_start: int


NEED_MORE = "need more"  # split_insert cannot decide yet: the statement head is still incomplete


def _refuse_input_function(text: bytes) -> None:
    """chDB runs ``INSERT ... SELECT ... FROM input(...)`` with its data as an empty input and
    answers success (0 rows written): refuse it rather than lose the data silently."""
    words = _words(text)
    try:
        first = next(words, None)
        if first is None or first[0] != b"INSERT":
            return
        if any(word == b"INPUT" for word, *_ in words):
            raise ClickHouseError.named(
                "NOT_IMPLEMENTED",
                "The embedded ClickHouse (chDB) cannot feed request data to the input() table function; "
                "insert with INSERT ... FORMAT instead",
            )
    except _Incomplete:
        return


def _refuse_into_outfile(statement: str) -> None:
    """chDB writes ``SELECT ... INTO OUTFILE`` to the server's disk, as clickhouse-local does; a
    server refuses it over HTTP (files are the client's business), and so does this one."""
    try:
        words = [word for word, *_ in _words(statement.encode())]
    except _Incomplete:
        return  # the engine refuses an unterminated statement itself
    if any(pair == (b"INTO", b"OUTFILE") for pair in itertools.pairwise(words)):
        raise ClickHouseError.named("INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")


def _readonly_error() -> ClickHouseError:
    return ClickHouseError.named(
        "READONLY",
        "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
        "You should use method POST for modifying queries",
    )


def _refuse_readonly_in_session(statement: str, query_class: str, readonly: int) -> None:
    """readonly for a request in a session, decided from the statement's kind and words.

    EMBEDDED-ONLY GAP: outside sessions the engine enforces readonly itself (see Lease.prepare), but
    a session's chDB connection cannot take it: once SET, readonly can never be reset, so it would
    outlive the request. This approximates the server: level 1 refuses every statement but reads
    and any SETTINGS clause (a server ignores those in subqueries; this refuses them); level 2 also
    allows SET and SETTINGS that leave readonly alone. A server has no such gap.
    """
    try:
        words = [word for word, *_ in _words(statement.encode())]
    except _Incomplete:
        return  # the engine refuses an unterminated statement itself
    first = words[0] if words else b""
    if query_class == "CONTROL":
        if first == b"USE" or (first == b"SET" and readonly == 2 and b"READONLY" not in words):
            return
        if first == b"SET":
            setting = "readonly" if b"READONLY" in words else "settings"
            raise ClickHouseError.named("READONLY", f"Cannot modify {setting} in readonly mode")
        raise _readonly_error()
    if query_class != "READ_ONLY":
        raise _readonly_error()
    if b"SETTINGS" in words and (readonly == 1 or b"READONLY" in words[words.index(b"SETTINGS") :]):
        raise ClickHouseError.named("READONLY", "Cannot modify settings in readonly mode")


def split_insert(text: bytes, final: bool) -> InsertSplit | str | None:
    """Find where the data of ``INSERT ... FORMAT name`` or ``INSERT ... VALUES`` begins.

    Returns an InsertSplit, None when the text is not an insert carrying data (any other query,
    or ``INSERT ... SELECT``), or NEED_MORE when ``text`` is a prefix that is not final yet.
    Like ClickHouse, data starts after the format name, its trailing blanks and one line break,
    so binary data that begins with whitespace bytes is kept whole.
    """
    words = _words(text)
    try:
        first = next(words, None)
        if first is None:
            return None if final else NEED_MORE
        if first[0] != b"INSERT":
            return None
        for word, start, end, depth in words:
            if depth:
                continue
            if word in (b"SELECT", b"WITH", b"INFILE"):
                return None
            if word == b"VALUES":
                return InsertSplit(text[:start].decode().rstrip(), "Values", end)
            if word == b"FORMAT":
                name = next(words, None)
                if name is None or (name[2] == len(text) and not final):
                    return None if final else NEED_MORE
                if text[end : name[1]].strip():
                    return None
                data_start = name[2]
                while data_start < len(text) and text[data_start] in b" \t":
                    data_start += 1
                if data_start == len(text) and not final:
                    return NEED_MORE
                if text.startswith(b"\r\n", data_start):
                    data_start += 2
                elif text.startswith(b"\n", data_start):
                    data_start += 1
                return InsertSplit(text[:start].decode().rstrip(), text[name[1] : name[2]].decode(), data_start)
    except _Incomplete:
        pass
    return None if final else NEED_MORE


def explicit_output_format(text: str, known: dict[str, str]) -> str | None:
    """The format named by a query's own top-level ``FORMAT x`` clause (canonical name), if any."""
    found = None
    raw = text.encode()
    try:
        words = list(_words(raw))
    except _Incomplete:
        return None
    for (word, _, word_end, depth), (_, start, end, _) in zip(words, words[1:]):
        if word == b"FORMAT" and not depth and not raw[word_end:start].strip():
            found = known.get(raw[start:end].decode().lower()) or found
    return found


def settings_statement(assignments: dict[str, str | None]) -> str:
    """``SET a = 'x', b = DEFAULT``: values always quoted, which ClickHouse casts to any setting type."""
    parts = []
    for name, value in assignments.items():
        if not _SETTING_NAME.match(name):
            raise ClickHouseError.named("UNKNOWN_SETTING", f"Unknown setting '{name}'")
        parts.append(f"{name} = DEFAULT" if value is None else f"{name} = {quote_string(value)}")
    return "SET " + ", ".join(parts)


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# --------------------------------------------------------------------------------------------
# Body codecs
# --------------------------------------------------------------------------------------------


class FrameChainDecoder:
    """Decodes a body made of one or more concatenated compressed frames.

    Every decompressor here stops at the end of its first frame and parks the rest in
    ``unused_data``; reading only that frame silently drops all later blocks of a
    clickhouse-connect insert, so each frame end starts a fresh decompressor.
    """

    def __init__(self, new_decompressor: Callable[[], Any]):
        self._new = new_decompressor
        self._current = new_decompressor()
        self._inside_frame = False

    def decode(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                self._inside_frame = True
                out.append(self._current.decompress(data))
                if not self._current.eof:
                    break
                data = self._current.unused_data
                self._current = self._new()
                self._inside_frame = False
        except Exception as exc:  # each library raises its own error type for corrupt input
            raise ClickHouseError.named("CANNOT_DECOMPRESS", f"Cannot decompress request body: {exc}") from exc
        return b"".join(out)

    def finish(self) -> None:
        if self._inside_frame:
            raise ClickHouseError.named("CANNOT_DECOMPRESS", "Request body ends inside a compressed frame")


class PassThrough:
    def decode(self, data: bytes) -> bytes:
        return data

    def finish(self) -> None:
        pass


def _zstd_module():
    try:
        from compression import zstd  # Python 3.14+
    except ImportError:
        from backports import zstd
    return zstd


def body_decoder(content_encoding: str | None) -> FrameChainDecoder | PassThrough:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity", "none"):
        return PassThrough()
    if encoding == "lz4":
        import lz4.frame

        return FrameChainDecoder(lz4.frame.LZ4FrameDecompressor)
    if encoding == "zstd":
        return FrameChainDecoder(_zstd_module().ZstdDecompressor)
    if encoding in ("gzip", "x-gzip"):
        return FrameChainDecoder(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    if encoding == "deflate":
        return FrameChainDecoder(zlib.decompressobj)
    raise ClickHouseError.named("UNKNOWN_COMPRESSION_METHOD", f"Unknown Content-Encoding of HTTP request: {encoding}")


class ResponseEncoder:
    """Streams one compressed frame over any number of response chunks."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        if encoding == "lz4":
            import lz4.frame

            self._lz4 = lz4.frame.LZ4FrameCompressor()
            self._header = self._lz4.begin()
        elif encoding == "zstd":
            self._compressor = _zstd_module().ZstdCompressor()
        else:
            self._compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)

    def encode(self, data: bytes) -> bytes:
        if self.encoding == "lz4":
            out, self._header = self._header + self._lz4.compress(data), b""
            return out
        return self._compressor.compress(data)

    def finish(self) -> bytes:
        if self.encoding == "lz4":
            return self._header + self._lz4.flush()
        return self._compressor.flush()


def response_encoding(accept_encoding: str | None, enabled: bool) -> str | None:
    """The first encoding the client accepts that we can produce; ClickHouse compresses only on request."""
    if not enabled or not accept_encoding:
        return None
    for item in accept_encoding.split(","):
        name = item.split(";")[0].strip().lower()
        if name in ("lz4", "zstd", "gzip", "deflate"):
            return name
    return None


# --------------------------------------------------------------------------------------------
# Engine: chDB connections, sessions, settings isolation (runs on worker threads)
# --------------------------------------------------------------------------------------------


class SessionSettings:
    """Keeps a request's settings from leaking into later requests of the same chDB session.

    A request's URL settings hold for that request only, while a session's own SET statements
    stick. clickhouse-connect repeats the same settings on every request, so the overrides stay
    applied and each request changes only the difference. The value a setting had before it was
    first overridden is read once, and restored when a later request no longer asks for it.
    """

    def __init__(self) -> None:
        self.applied: dict[str, str] = {}
        self.original: dict[str, str | None] = {}  # None: the engine default
        self.database: str | None = None
        self.original_database = ""

    def apply(self, conn: Any, wanted: dict[str, str], database: str | None) -> None:
        changes: dict[str, str | None] = {k: v for k, v in wanted.items() if self.applied.get(k) != v}
        dropped = [k for k in self.applied if k not in wanted]
        if changes or dropped:
            unseen = [k for k in changes if k not in self.original and _SETTING_NAME.match(k)]
            if unseen:
                self.original.update(_current_settings(conn, unseen))
            changes.update({k: self.original.get(k) for k in dropped})
            _run(conn, settings_statement(changes))
            for k in dropped:
                del self.applied[k]
            self.applied.update(wanted)
        if database != self.database:
            if self.database is None:
                self.original_database = _run(conn, "SELECT currentDatabase()").bytes().decode().strip()
            _run(conn, f"USE {quote_identifier(database or self.original_database)}")
            self.database = database

    def restore(self, conn: Any) -> None:
        """Back to the session's own state, before a statement that changes that state (SET, USE)."""
        self.apply(conn, {}, None)
        self.original.clear()


def _current_settings(conn: Any, names: list[str]) -> dict[str, str | None]:
    listed = ", ".join(quote_string(n) for n in names)
    rows = _run(
        conn, f"SELECT name, value, changed FROM system.settings WHERE name IN ({listed})", "JSONCompactEachRow"
    )
    current = {}
    for line in rows.bytes().splitlines():
        name, value, changed = json.loads(line)
        current[name] = value if int(changed) else None
    return current


def _run(conn: Any, sql: str | bytes, fmt: str = "TabSeparated", params: dict[str, str] | None = None) -> Any:
    try:
        return conn.query(sql, fmt, params=params or {})
    except RuntimeError as exc:
        raise ClickHouseError.from_engine(exc) from None


@dataclass
class Session:
    session_id: str
    conn: Any
    timeout_s: float
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    settings: SessionSettings = field(default_factory=SessionSettings)


@dataclass
class Summary:
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def of(cls, result: Any) -> Summary:
        return cls(
            read_rows=result.storage_rows_read(),
            read_bytes=result.storage_bytes_read(),
            written_rows=result.rows_written(),
            written_bytes=result.bytes_written(),
            result_rows=result.rows_read(),
            result_bytes=result.bytes_read(),
            elapsed_s=result.elapsed(),
        )

    def header(self) -> str:
        values = {
            "read_rows": self.read_rows,
            "read_bytes": self.read_bytes,
            "written_rows": self.written_rows,
            "written_bytes": self.written_bytes,
            "total_rows_to_read": 0,
            "result_rows": self.result_rows,
            "result_bytes": self.result_bytes,
            "elapsed_ns": int(self.elapsed_s * 1e9),
        }
        return json.dumps({k: str(v) for k, v in values.items()}, separators=(",", ":"))


@dataclass
class Outcome:
    """What a statement produced: a body (whole or as a stream) and, for result sets, its format."""

    body: bytes
    format: str | None
    summary: Summary
    stream: Any = None  # an engine streaming result still holding more chunks


class Lease:
    """One request's use of a chDB connection: its own, or its session's."""

    def __init__(self, engine: ChdbEngine, conn: Any, session: Session | None):
        self.engine = engine
        self.conn = conn
        self.session = session

    def prepare(self, statement: str, settings: dict[str, str], database: str | None, readonly: int) -> str:
        """Refuse what a server refuses, then put the request's settings in force; returns the query class."""
        if not statement.strip():
            raise ClickHouseError.named("SYNTAX_ERROR", "Empty query")
        info = self.conn.classify_query(statement)
        if info["statement_count"] > 1:
            raise ClickHouseError.named(
                "SYNTAX_ERROR", "Syntax error (Multi-statements are not allowed): send one statement per request"
            )
        query_class = info["query_class"].name
        _refuse_into_outfile(statement)
        if readonly and query_class.startswith("MUTATING"):
            # refused before any insert data is read; the engine would refuse it too, but only later
            raise _readonly_error()
        if self.session is None:
            # A fresh connection, so nothing to restore. readonly is set natively, last: the engine
            # then refuses writes, SET and SETTINGS clauses exactly as a server does, after the
            # request's own settings were applied (a server applies a request's settings together).
            wanted = dict(settings) | ({"readonly": str(readonly)} if readonly else {})
            if wanted:
                _run(self.conn, settings_statement(wanted))
            if database:
                _run(self.conn, f"USE {quote_identifier(database)}")
            return query_class
        if readonly:
            _refuse_readonly_in_session(statement, query_class, readonly)
        if query_class == "CONTROL":
            # SET / USE change the session itself; they must land on its own state, not on overrides
            self.session.settings.restore(self.conn)
        else:
            self.session.settings.apply(self.conn, settings, database)
        return query_class

    def execute(
        self,
        text: bytes,
        params: dict[str, str],
        request_settings: dict[str, str],
        database: str | None,
        default_format: str,
        readonly: int,
        stream: bool,
    ) -> Outcome:
        try:
            sql: str | bytes = text.decode()
        except UnicodeDecodeError:
            sql = text  # binary parameter values bound into the text: chDB takes such SQL as bytes
        readable = text.decode(errors="replace")
        query_class = self.prepare(readable, request_settings, database, readonly)
        explicit = explicit_output_format(readable, self.engine.output_formats)
        fmt = explicit or default_format
        produces_rows = query_class == "READ_ONLY" or explicit is not None
        if produces_rows and stream and fmt in STREAMABLE_FORMATS:
            try:
                handle = self.conn.send_query(sql, fmt, params=params)
            except RuntimeError as exc:
                error = ClickHouseError.from_engine(exc)
                # chDB streams only SELECT-like queries; EXISTS, SHOW and the like are small anyway
                if "Streaming query is not supported" not in error.message:
                    raise error from None
            else:
                first = self.fetch(handle)
                return Outcome(first, fmt, Summary(), stream=handle if first else None)
        result = _run(self.conn, sql, fmt, params)
        body = result.bytes() or b""
        return Outcome(body, fmt if produces_rows or body else None, Summary.of(result))

    def fetch(self, handle: Any) -> bytes:
        """The next chunk of a streamed result; empty when it is exhausted."""
        try:
            chunk = self.conn.streaming_fetch_result(handle)
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None
        if chunk.has_error():
            raise ClickHouseError.from_engine(RuntimeError(chunk.error_message()))
        return chunk.bytes() or b""

    def cancel_stream(self, handle: Any) -> None:
        self.conn.streaming_cancel_query(handle)

    def begin_insert(
        self, split: InsertSplit, settings: dict[str, str], database: str | None, readonly: int
    ) -> PendingInsert:
        self.prepare(split.statement, settings, database, readonly)
        return PendingInsert(split.statement, split.format)

    def feed(self, insert: PendingInsert, decoder: FrameChainDecoder | PassThrough, raw: bytes) -> None:
        data = decoder.decode(raw)
        if not data:
            return
        if insert.streaming is None:
            insert.buffer += data
            if len(insert.buffer) > WHOLE_INSERT_MAX_BYTES:
                self._start_streaming(insert)
            return
        self._append(insert, data)

    def finish_insert(self, insert: PendingInsert, decoder: FrameChainDecoder | PassThrough) -> Summary:
        decoder.finish()
        if insert.streaming is None and insert.whole_query_safe():
            head = f"{insert.statement} FORMAT {insert.format}\n".encode()
            result = _run(self.conn, head + insert.buffer)
            insert.buffer = bytearray()
            return Summary(
                written_rows=result.rows_written(), written_bytes=result.bytes_written(), elapsed_s=result.elapsed()
            )
        if insert.streaming is None:
            self._start_streaming(insert)
        try:
            result = self.conn.insert_done(insert.streaming)
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None
        return Summary(
            written_rows=result.rows_written(), written_bytes=result.bytes_written(), elapsed_s=result.elapsed()
        )

    def cancel_insert(self, insert: PendingInsert) -> None:
        if insert.streaming is not None:
            self.conn.insert_cancel(insert.streaming)

    def _start_streaming(self, insert: PendingInsert) -> None:
        try:
            insert.streaming = self.conn.send_insert(insert.statement, insert.format)
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None
        data, insert.buffer = bytes(insert.buffer), bytearray()
        if data:
            self._append(insert, data)

    def _append(self, insert: PendingInsert, data: bytes) -> None:
        try:
            self.conn.insert_append(insert.streaming, data)
        except RuntimeError as exc:
            raise ClickHouseError.from_engine(exc) from None


@dataclass
class PendingInsert:
    """An insert's data on its way to the engine, which takes it one of two ways.

    As one query (statement and data in one text) when it fits in memory and chDB can parse it:
    that way a failing materialized view fails the insert, as on a server. chDB's streaming
    ``send_insert`` reports success although a view failed (the source keeps its rows, the view's
    target gets none), so the client would never retry. But chDB cuts data that is part of the
    query text at its first empty line (RowBinary cut silently, CSV with a quoted blank line
    refused), and parses such data at about twice the CPU per row, so data holding a blank line
    (much binary data) and data larger than :data:`WHOLE_INSERT_MAX_BYTES` are streamed, where a
    view's failure stays unreported: small inserts (the sink's when it is caught up) fail as on a
    server, large ones (a backlog's) do not.
    """

    statement: str
    format: str
    buffer: bytearray = field(default_factory=bytearray)
    streaming: Any = None  # chDB's insert handle once the data goes the streaming way

    def whole_query_safe(self) -> bool:
        # the statement head ends with a line break, so a leading one is a blank line too
        return (
            not self.buffer.startswith((b"\n", b"\r\n")) and b"\n\n" not in self.buffer and b"\n\r\n" not in self.buffer
        )


class EngineUnavailable(Exception):
    pass


class ChdbEngine:
    """The chDB engine of one data path, shared by every request of this process."""

    def __init__(self, path: str, workers: int = WORKER_THREADS):
        import chdb._chdb as chdb_native

        self._native = chdb_native
        # chDB would otherwise install its own SIGTERM/SIGINT handlers over the server's clean shutdown
        chdb_native.set_signal_handlers_enabled(0)
        os.makedirs(path, exist_ok=True)
        self.path = path
        # The engine shuts down when its last connection closes; this one keeps it up between requests.
        try:
            self._anchor = chdb_native.connect(path)
        except RuntimeError as exc:
            raise EngineUnavailable(
                f"cannot open chDB data path {os.path.abspath(path)} (one process per path: is another embedded "
                f"ClickHouse using it?): {exc}"
            ) from None
        self.version, self.timezone, compression = (
            _run(self._anchor, "SELECT version(), timezone(), getSetting('enable_http_compression')")
            .bytes()
            .decode()
            .strip()
            .split("\t")
        )
        # chDB turns enable_http_compression on and reports it in system.settings; clients that read
        # it (clickhouse-connect) then only send Accept-Encoding and expect a compressed answer
        self.http_compression = _truthy(compression)
        formats = _run(self._anchor, "SELECT name FROM system.formats WHERE is_output").bytes().decode().split()
        self.output_formats = {name.lower(): name for name in formats}
        self.sessions: dict[str, Session] = {}
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="chdb")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def connect(self) -> Any:
        return self._native.connect(self.path)

    async def lease(self, session_id: str | None, timeout_s: float, check: bool) -> Lease:
        if not session_id:
            return Lease(self, await self.call(self.connect), None)
        session = self.sessions.get(session_id)
        if session is None:
            if check:
                raise ClickHouseError.named("SESSION_NOT_FOUND", f"Session {session_id} not found")
            session = Session(session_id, await self.call(self.connect), timeout_s)
            # another request may have opened the same session while this one waited for a thread
            if self.sessions.setdefault(session_id, session) is not session:
                await self.call(session.conn.close)
                session = self.sessions[session_id]
        if session.busy:
            raise ClickHouseError.named("SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
        session.busy = True
        session.timeout_s = timeout_s
        return Lease(self, session.conn, session)

    async def release(self, lease: Lease) -> None:
        if lease.session is None:
            await self.call(lease.conn.close)
        else:
            lease.session.busy = False
            lease.session.last_used = time.monotonic()

    async def expire_sessions(self) -> None:
        now = time.monotonic()
        for session in [s for s in self.sessions.values() if not s.busy and now - s.last_used > s.timeout_s]:
            del self.sessions[session.session_id]
            await self.call(session.conn.close)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for session in self.sessions.values():
            session.conn.close()
        self.sessions.clear()
        self._anchor.close()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class QueryRequest:
    """The parts of one HTTP request that steer execution, transport parameters removed."""

    query: str | None
    params: dict[str, str]
    settings: dict[str, str]
    query_id: str
    session_id: str | None
    session_timeout_s: float
    session_check: bool
    database: str | None
    default_format: str
    wait_end_of_query: bool
    compress_response: bool
    max_query_size: int
    readonly: int  # ClickHouse's levels: 0 any statement, 1 reads only, 2 reads and settings changes

    @classmethod
    def parse(cls, values: dict[str, str], query_id: str, compress_by_default: bool) -> QueryRequest:
        for unsupported in ("compress", "decompress"):
            if _truthy(values.get(unsupported)):
                raise ClickHouseError.named(
                    "NOT_IMPLEMENTED",
                    f"The embedded ClickHouse does not implement `{unsupported}=1` (ClickHouse's native block "
                    "compression over HTTP); use HTTP Content-Encoding / Accept-Encoding instead",
                )
        try:
            timeout = float(values.get("session_timeout") or DEFAULT_SESSION_TIMEOUT_S)
            # also a setting the engine's parser enforces, so it stays among the settings
            max_query_size = int(values.get("max_query_size") or MAX_QUERY_SIZE)
        except ValueError as exc:
            raise ClickHouseError.named("BAD_ARGUMENTS", f"Invalid HTTP parameter: {exc}") from None
        if not 0 <= timeout <= MAX_SESSION_TIMEOUT_S:
            raise ClickHouseError.named(
                "BAD_ARGUMENTS",
                f"Session timeout {timeout:g} is larger than max_session_timeout: {MAX_SESSION_TIMEOUT_S}",
            )
        return cls(
            query=values.get("query"),
            params={k[6:]: v for k, v in values.items() if k.startswith("param_")},
            settings={k: v for k, v in values.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")},
            query_id=query_id,
            session_id=values.get("session_id") or None,
            session_timeout_s=timeout,
            session_check=_truthy(values.get("session_check")),
            database=values.get("database") or None,
            default_format=values.get("default_format") or "TabSeparated",
            wait_end_of_query=_truthy(values.get("wait_end_of_query")),
            compress_response=_truthy(values["enable_http_compression"])
            if "enable_http_compression" in values
            else compress_by_default,
            max_query_size=max_query_size,
            readonly=_readonly_level(values.get("readonly")),
        )


def _readonly_level(value: str | None) -> int:
    try:
        level = int((value or "0").strip())
    except ValueError:
        raise ClickHouseError.named("BAD_ARGUMENTS", f"Cannot parse readonly = {value!r} as a number") from None
    return level if level in (0, 2) else 1


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


class RequestBody:
    """The request body after Content-Encoding, read as a statement head and then as raw batches."""

    def __init__(self, request: web.BaseRequest | None, decoder: FrameChainDecoder | PassThrough):
        self._content = request.content if request is not None and request.body_exists else None
        self.decoder = decoder

    async def raw_chunks(self) -> AsyncIterator[bytes]:
        if self._content is None:
            return
        while chunk := await self._content.readany():
            yield chunk

    async def raw_batches(self, size: int) -> AsyncIterator[bytes]:
        batch: list[bytes] = []
        pending = 0
        async for chunk in self.raw_chunks():
            batch.append(chunk)
            pending += len(chunk)
            if pending >= size:
                yield b"".join(batch)
                batch, pending = [], 0
        if batch:
            yield b"".join(batch)

    async def read_all(self, limit: int, prefix: bytes = b"") -> bytes:
        data = bytearray(prefix)
        async for chunk in self.raw_chunks():
            data += self.decoder.decode(chunk)
            if len(data) > limit:
                raise _query_too_large(limit)
        self.decoder.finish()
        return bytes(data)

    async def read_head(self, limit: int) -> tuple[bytes, InsertSplit | None, bool]:
        """Read decoded bytes until the statement head is known; returns (bytes read, split, body exhausted)."""
        head = bytearray()
        async for chunk in self.raw_chunks():
            head += self.decoder.decode(chunk)
            split = split_insert(bytes(head), final=False)
            if split is not NEED_MORE:
                return bytes(head), split, False
            if len(head) > limit:
                raise _query_too_large(limit)
        self.decoder.finish()
        split = split_insert(bytes(head), final=True)
        return bytes(head), split, True


def _query_too_large(limit: int) -> ClickHouseError:
    return ClickHouseError.named("SYNTAX_ERROR", f"Syntax error: Max query size exceeded (max_query_size = {limit})")


class ClickHouseHttp:
    """Request handling: ClickHouse's HTTP protocol in front of a ChdbEngine."""

    def __init__(self, engine: ChdbEngine, user: str = DEFAULT_USER, password: str = ""):
        self.engine = engine
        self._user = user
        self._password = password

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        try:
            if request.method not in ("GET", "HEAD", "POST"):
                raise ClickHouseError.named("NOT_IMPLEMENTED", f"HTTP method {request.method} is not supported")
            if request.path in ("/ping", "/replicas_status") or (
                request.path == "/" and request.method != "POST" and "query" not in request.query
            ):
                return web.Response(text="Ok.\n")
            if request.path != "/":
                return web.Response(
                    status=404, text=f"There is no handle {request.path}\n\nUse / or /ping for health checks.\n"
                )
            self._authenticate(request)
            return await self._serve_query(request, query_id)
        except ClickHouseError as err:
            log.debug("query %s failed: %s", query_id, err.message)
            return self._error_response(err, query_id)
        except Exception as exc:
            log.exception("query %s failed", query_id)
            return self._error_response(ClickHouseError.named("STD_EXCEPTION", repr(exc)), query_id)

    def _authenticate(self, request: web.BaseRequest) -> None:
        user, password = request.query.get("user"), request.query.get("password")
        if "X-ClickHouse-User" in request.headers:
            user, password = request.headers["X-ClickHouse-User"], request.headers.get("X-ClickHouse-Key", "")
        authorization = request.headers.get("Authorization", "")
        if authorization.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                user = None
        user = user or DEFAULT_USER
        password = password or ""
        if not (hmac.compare_digest(user, self._user) and hmac.compare_digest(password, self._password)):
            raise ClickHouseError.named(
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )

    async def _request_values(self, request: web.BaseRequest) -> tuple[dict[str, str], bool]:
        """URL parameters, plus multipart form fields (which then stand in for the body)."""
        values = dict(request.query)
        if request.method != "POST" or not request.content_type.startswith("multipart/form-data"):
            return values, False
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.filename:
                raise ClickHouseError.named(
                    "NOT_IMPLEMENTED",
                    "The embedded ClickHouse does not implement external data (temporary tables from files)",
                )
            values[part.name or ""] = await part.text()
        return values, True

    async def _serve_query(self, request: web.BaseRequest, query_id: str) -> web.StreamResponse:
        values, body_was_form = await self._request_values(request)
        req = QueryRequest.parse(values, query_id, self.engine.http_compression)
        # as on a server, GET may read and change settings but write nothing
        readonly = req.readonly or (2 if request.method != "POST" else 0)
        body = RequestBody(
            None if request.method != "POST" or body_was_form else request,
            body_decoder(request.headers.get("Content-Encoding")),
        )
        encoding = response_encoding(request.headers.get("Accept-Encoding"), req.compress_response)
        lease = await self.engine.lease(req.session_id, req.session_timeout_s, req.session_check)
        try:
            if req.query is not None:
                query_bytes = req.query.encode()
                split = split_insert(query_bytes, final=True)
                if split is not None:
                    # ClickHouse reads the query parameter, a line break, then the body
                    prefix = query_bytes[split.data_start :]
                    return await self._insert(
                        lease, req, split, body, readonly, prefix=prefix + b"\n" if prefix else b""
                    )
                rest = await body.read_all(req.max_query_size)
                text = query_bytes + b"\n" + rest if rest else query_bytes
            else:
                head, split, exhausted = await body.read_head(req.max_query_size)
                if split is not None:
                    return await self._insert(lease, req, split, body, readonly, head[split.data_start :], exhausted)
                text = head if exhausted else await body.read_all(req.max_query_size, prefix=head)
            if len(text) > req.max_query_size:
                raise _query_too_large(req.max_query_size)
            _refuse_input_function(text)
            return await self._execute(request, lease, req, text, readonly, encoding)
        finally:
            await self.engine.release(lease)

    async def _execute(
        self,
        request: web.BaseRequest,
        lease: Lease,
        req: QueryRequest,
        text: bytes,
        readonly: int,
        encoding: str | None,
    ) -> web.StreamResponse:
        stream = not req.wait_end_of_query
        outcome: Outcome = await self.engine.call(
            lease.execute, text, req.params, req.settings, req.database, req.default_format, readonly, stream
        )
        headers = self._headers(req.query_id, outcome.summary, outcome.format, encoding)
        if outcome.stream is None:
            body = outcome.body
            if encoding:
                coder = ResponseEncoder(encoding)
                body = coder.encode(body) + coder.finish()
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        coder = ResponseEncoder(encoding) if encoding else None
        handle = outcome.stream
        try:
            await response.prepare(request)
            chunk = outcome.body
            while chunk:
                await response.write(coder.encode(chunk) if coder else chunk)
                chunk = await self.engine.call(lease.fetch, handle)
            handle = None
            if coder:
                await response.write(coder.finish())
            await response.write_eof()
            return response
        except (ClickHouseError, ConnectionError) as exc:
            # Headers are gone: like ClickHouse, break the chunked stream so the client cannot take
            # a truncated result for a complete one.
            log.warning("query %s failed while streaming: %s", req.query_id, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            if handle is not None:
                await self.engine.call(lease.cancel_stream, handle)

    async def _insert(
        self,
        lease: Lease,
        req: QueryRequest,
        split: InsertSplit,
        body: RequestBody,
        readonly: int,
        prefix: bytes,
        exhausted: bool = False,
    ) -> web.StreamResponse:
        inserter = await self.engine.call(lease.begin_insert, split, req.settings, req.database, readonly)
        done = False
        pending: asyncio.Future | None = None
        try:
            if prefix:
                await self.engine.call(lease.feed, inserter, PassThrough(), prefix)
            if not exhausted:
                # the engine parses one batch while the next is read from the socket
                async for raw in body.raw_batches(INSERT_BATCH_BYTES):
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(self.engine.call(lease.feed, inserter, body.decoder, raw))
                if pending is not None:
                    await pending
                    pending = None
            summary = await self.engine.call(lease.finish_insert, inserter, body.decoder)
            done = True
        except Exception as exc:
            if not isinstance(exc, ClickHouseError):
                # a body cut short (client gone, bad chunking) must never commit what arrived so far
                exc = ClickHouseError.named(
                    "UNEXPECTED_END_OF_FILE", f"Cannot read insert data from the request body: {exc!r}"
                )
            raise exc from None
        finally:
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
            if not done:
                await self.engine.call(lease.cancel_insert, inserter)
        return web.Response(headers=self._headers(req.query_id, summary, None, None))

    def _headers(self, query_id: str, summary: Summary, fmt: str | None, encoding: str | None) -> dict[str, str]:
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.engine.timezone,
            "X-ClickHouse-Server-Display-Name": "spendstream-embedded-clickhouse",
            "X-ClickHouse-Summary": summary.header(),
            "Content-Type": CONTENT_TYPES.get(
                fmt or "", "text/plain; charset=UTF-8" if fmt is None else "application/octet-stream"
            ),
        }
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
        if encoding:
            headers["Content-Encoding"] = encoding
        return headers

    def _error_response(self, err: ClickHouseError, query_id: str) -> web.Response:
        return web.Response(
            status=err.http_status,
            text=err.body(self.engine.version),
            headers={
                "X-ClickHouse-Exception-Code": str(err.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Timezone": self.engine.timezone,
            },
        )


# --------------------------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------------------------


async def serve(host: str, port: int, path: str, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then finish in-flight requests and close the engine."""
    engine = await asyncio.to_thread(ChdbEngine, path)
    http = ClickHouseHttp(engine, os.environ.get(USER_ENV) or DEFAULT_USER, os.environ.get(PASSWORD_ENV, ""))
    server = web.Server(
        http.handle,
        auto_decompress=False,  # Content-Encoding is ours to decode: lz4/zstd frame chains included
        max_line_size=MAX_URI_BYTES,
        max_field_size=MAX_URI_BYTES,
        access_log=None,  # one line per request would swamp the log under insert load
    )
    runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info(
        "embedded ClickHouse %s (chDB) on http://%s:%d, data in %s", engine.version, host, port, os.path.abspath(path)
    )
    sweeper = asyncio.create_task(_expire_sessions_forever(engine))
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        await runner.cleanup()
        engine.close()
        log.info("embedded ClickHouse stopped")


async def _expire_sessions_forever(engine: ChdbEngine) -> None:
    while True:
        await asyncio.sleep(1.0)
        await engine.expire_sessions()


def run_forever(host: str, port: int, path: str) -> None:
    """Run the embedded ClickHouse in the foreground until SIGTERM or SIGINT."""
    # A ClickHouse server runs in UTC unless told otherwise; the engine reads TZ when it starts.
    os.environ["TZ"] = "UTC"
    time.tzset()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(host, port, path, stop)

    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        (uvloop.run if uvloop else asyncio.run)(main())
    except EngineUnavailable as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
