"""The embedded ClickHouse (HTTP interface on chDB) driven the way services drive ClickHouse:
through clickhouse-connect's sync and async clients, plus plain HTTP for health and error format."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from spendstream.embedded.clickhouse import EmbeddedClickHouse
from spendstream.embedded.clickhouse_server import NEED_MORE, InsertSplit, split_insert

pytestmark = pytest.mark.clickhouse


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedClickHouse]:
    with EmbeddedClickHouse(str(tmp_path_factory.mktemp("embedded-clickhouse") / "data")) as ch:
        yield ch


@pytest.fixture
def database(server: EmbeddedClickHouse) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = clickhouse_connect.get_client(host=server.host, port=server.port)
    admin.command(f"CREATE DATABASE {name}")
    yield name
    admin.command(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


@pytest.fixture
def client(server: EmbeddedClickHouse, database: str) -> Iterator[clickhouse_connect.driver.Client]:
    c = clickhouse_connect.get_client(host=server.host, port=server.port, database=database)
    yield c
    c.close()


@pytest.fixture
async def async_client(server: EmbeddedClickHouse, database: str) -> AsyncIterator:
    c = await clickhouse_connect.get_async_client(host=server.host, port=server.port, database=database)
    yield c
    await c.close()


def _setting(c, name: str, **kwargs) -> str:
    return c.query(f"SELECT getSetting('{name}')", **kwargs).result_rows[0][0]


# --- plain HTTP ------------------------------------------------------------------------------


def test_ping_and_root_answer_ok(server: EmbeddedClickHouse) -> None:
    for path in ("/ping", "/"):
        response = httpx.get(server.url + path)
        assert (response.status_code, response.text) == (200, "Ok.\n")


def test_errors_have_clickhouse_shape_over_plain_http(server: EmbeddedClickHouse) -> None:
    response = httpx.post(server.url, content="SELECT * FROM no_such_table")
    assert response.status_code == 404
    assert response.headers["X-ClickHouse-Exception-Code"] == "60"
    assert response.text.startswith("Code: 60. DB::Exception: ")
    assert "(UNKNOWN_TABLE) (version 26." in response.text

    # GET is read-only, as on a ClickHouse server, and so is any request with readonly=1
    httpx.post(server.url, content="CREATE TABLE ro (a Int8) ENGINE = Memory").raise_for_status()
    for refused in (
        httpx.get(server.url, params={"query": "CREATE TABLE get_made_this (a Int8) ENGINE = Memory"}),
        httpx.get(server.url, params={"query": "INSERT INTO ro VALUES (1)"}),
        httpx.post(server.url, params={"readonly": "1"}, content="INSERT INTO ro VALUES (2)"),
    ):
        assert refused.status_code == 403
        assert refused.headers["X-ClickHouse-Exception-Code"] == "164"
    assert httpx.post(server.url, content="SELECT count() FROM ro").text == "0\n"
    httpx.post(server.url, content="DROP TABLE ro").raise_for_status()

    response = httpx.get(server.url, params={"query": "SELECT 40 + {n:UInt8}", "param_n": "2"})
    assert (response.status_code, response.text, response.headers["X-ClickHouse-Format"]) == (
        200,
        "42\n",
        "TabSeparated",
    )


# --- clickhouse-connect ------------------------------------------------------------------------

USAGE_DDL = """
CREATE TABLE usage (
    event_id String,
    ts DateTime64(3, 'UTC'),
    model LowCardinality(String),
    tags Map(String, String),
    tokens Int64,
    cost_nano Int64,
    cost_usd Decimal(38, 9)
) ENGINE = MergeTree ORDER BY (model, ts, event_id)
"""


def _usage_rows(n: int, start: int = 0) -> list[list]:
    return [
        [
            f"e{i}",
            datetime(2026, 1, 2, 3, 4, 5, (i % 1000) * 1000, tzinfo=UTC),
            ("gpt-4o", "claude-sonnet-4", "gemini-2.5-pro")[i % 3],
            {"team": f"t{i % 5}", "env": "prod"},
            i * 1_000,
            i * 2_500_000_123,
            Decimal(i * 2_500_000_123) / Decimal(10**9),
        ]
        for i in range(start, start + n)
    ]


USAGE_COLUMNS = ["event_id", "ts", "model", "tags", "tokens", "cost_nano", "cost_usd"]


def test_ddl_insert_and_typed_roundtrip_sync(client) -> None:
    client.command(USAGE_DDL)
    rows = _usage_rows(3_000)
    summary = client.insert("usage", rows, column_names=USAGE_COLUMNS)
    assert summary.written_rows == 3_000

    back = client.query("SELECT * FROM usage WHERE event_id = 'e1234'").result_rows[0]
    event_id, ts, model, tags, tokens, cost_nano, cost_usd = back
    assert (event_id, model, tags, tokens, cost_nano) == (
        "e1234",
        "claude-sonnet-4",
        {"team": "t4", "env": "prod"},
        1_234_000,
        3_085_000_151_782,
    )
    assert cost_usd == Decimal("3085.000151782")
    assert ts.replace(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, 234_000, tzinfo=UTC)

    totals = client.query("SELECT count(), sum(cost_nano), sum(cost_usd), uniqExact(model) FROM usage").result_rows[0]
    expected_nano = sum(i * 2_500_000_123 for i in range(3_000))
    assert totals == (3_000, expected_nano, Decimal(expected_nano) / Decimal(10**9), 3)
    assert client.command("EXISTS TABLE usage") == 1


async def test_async_client_parallel_inserts_and_queries(async_client) -> None:
    await async_client.command(USAGE_DDL)
    batches = [_usage_rows(2_000, start) for start in range(0, 16_000, 2_000)]
    summaries = await asyncio.gather(*(async_client.insert("usage", b, column_names=USAGE_COLUMNS) for b in batches))
    assert sum(s.written_rows for s in summaries) == 16_000

    counts = await asyncio.gather(
        *(
            async_client.query("SELECT count() FROM usage WHERE model = {m:String}", parameters={"m": m})
            for m in ("gpt-4o", "claude-sonnet-4", "gemini-2.5-pro")
        )
    )
    assert sorted(r.result_rows[0][0] for r in counts) == [5_333, 5_333, 5_334]
    assert await async_client.command("SELECT sum(tokens) FROM usage") == sum(i * 1_000 for i in range(16_000))


def test_server_side_parameters(client) -> None:
    result = client.query(
        "SELECT {s:String} AS s, {ids:Array(Int64)} AS ids, {ts:DateTime64(3, 'UTC')} AS ts, {d:Decimal(38, 9)} AS d",
        parameters={
            "s": 'it\'s \\ "quoted"',
            "ids": [1, -2, 3],
            "ts": datetime(2026, 5, 6, 7, 8, 9, 123_000),
            "d": Decimal("0.000000001"),
        },
    ).result_rows[0]
    assert result[:2] == ('it\'s \\ "quoted"', [1, -2, 3])
    assert result[2].replace(tzinfo=None) == datetime(2026, 5, 6, 7, 8, 9, 123_000)
    assert result[3] == Decimal("0.000000001")


async def test_per_query_settings_do_not_leak(client, async_client) -> None:
    default = _setting(client, "max_threads")
    assert _setting(client, "max_threads", settings={"max_threads": 1}) == 1
    assert _setting(client, "max_threads") == default
    assert (await async_client.query("SELECT getSetting('max_threads')", settings={"max_threads": 1})).result_rows[0][
        0
    ] == 1
    assert (await async_client.query("SELECT getSetting('max_threads')")).result_rows[0][0] == default
    # an insert's deduplication token must not stick to the next request on the same session
    client.command(
        "CREATE TABLE t (a Int64) ENGINE = MergeTree ORDER BY a SETTINGS non_replicated_deduplication_window = 100"
    )
    client.insert("t", [[1]], settings={"insert_deduplication_token": "once"})
    assert _setting(client, "insert_deduplication_token") == ""
    client.insert("t", [[2]])
    assert client.command("SELECT count() FROM t") == 2


def test_sessions_keep_their_own_set(server: EmbeddedClickHouse) -> None:
    first = clickhouse_connect.get_client(host=server.host, port=server.port)
    second = clickhouse_connect.get_client(host=server.host, port=server.port)
    default = _setting(second, "max_threads")
    first.command("SET max_threads = 3")
    assert _setting(first, "max_threads") == 3
    assert _setting(second, "max_threads") == default
    # a per-query setting overrides the session's SET for one query, then the session's value is back
    assert _setting(first, "max_threads", settings={"max_threads": 5}) == 5
    assert _setting(first, "max_threads") == 3
    first.close()
    second.close()


async def test_concurrent_use_of_one_session_is_refused_like_clickhouse(server: EmbeddedClickHouse) -> None:
    params = {"session_id": f"s-{uuid.uuid4()}"}
    marker = f"held_{uuid.uuid4().hex[:10]}"
    running = (
        f"SELECT count() FROM system.processes WHERE query LIKE '%{marker}%' AND query NOT LIKE '%system.processes%'"
    )
    async with httpx.AsyncClient(base_url=server.url) as http:
        slow = asyncio.create_task(http.post("/", params=params, content=f"SELECT sleep(1) AS {marker}"))
        while (await http.post("/", content=running)).text != "1\n":  # until the slow query holds the session
            pass
        busy = await http.post("/", params=params, content="SELECT 1")
        assert (await slow).status_code == 200
    assert busy.status_code == 500
    assert busy.headers["X-ClickHouse-Exception-Code"] == "373"


async def test_errors_raise_database_error_with_code(client, async_client) -> None:
    for run in (client.query, client.command):
        with pytest.raises(DatabaseError) as err:
            run("SELECT * FROM missing")
        assert err.value.code == 60
    with pytest.raises(DatabaseError) as err:
        client.query("SELEC 1")
    assert err.value.code == 62
    with pytest.raises(DatabaseError) as err:
        await async_client.query("SELECT 1", settings={"no_such_setting": 1})
    assert err.value.code == 115
    with pytest.raises(DatabaseError) as err:
        await async_client.insert("missing", [[1]], column_names=["a"], column_type_names=["Int64"])
    assert err.value.code == 60


def test_multi_statement_is_refused_and_nothing_runs(client) -> None:
    with pytest.raises(DatabaseError) as err:
        client.command("CREATE TABLE made (a Int8) ENGINE = Memory; SELECT 1")
    assert err.value.code == 62
    assert "Multi-statements are not allowed" in str(err.value)
    assert client.command("EXISTS TABLE made") == 0


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip"])
def test_large_insert_counts_exactly_across_compressed_frames(
    server: EmbeddedClickHouse, database: str, compression: str
) -> None:
    # clickhouse-connect sends each Native block as its own compressed frame; 1M rows are 8 blocks
    rows = 1_000_000 if compression == "lz4" else 300_000
    c = clickhouse_connect.get_client(host=server.host, port=server.port, database=database, compress=compression)
    c.command("CREATE TABLE big (n Int64, s LowCardinality(String)) ENGINE = MergeTree ORDER BY n")
    numbers = list(range(rows))
    c.insert("big", [numbers, [("a", "b", "c")[i % 3] for i in numbers]], column_names=["n", "s"], column_oriented=True)
    assert c.query("SELECT count(), sum(n), uniqExact(s) FROM big").result_rows[0] == (rows, rows * (rows - 1) // 2, 3)
    with c.query_rows_stream("SELECT n FROM big ORDER BY n") as stream:
        assert sum(1 for _ in stream) == rows
    c.close()


async def test_retried_insert_with_token_is_deduplicated_in_raw_table_and_mv(client, async_client) -> None:
    client.command("""
        CREATE TABLE raw (tenant String, cost_nano Int64) ENGINE = MergeTree ORDER BY tenant
        SETTINGS non_replicated_deduplication_window = 1000""")
    client.command("""
        CREATE TABLE spend (tenant String, cost_nano Int64) ENGINE = SummingMergeTree ORDER BY tenant
        SETTINGS non_replicated_deduplication_window = 1000""")
    client.command(
        "CREATE MATERIALIZED VIEW spend_mv TO spend AS SELECT tenant, sum(cost_nano) AS cost_nano FROM raw GROUP BY tenant"
    )

    def token(name: str) -> dict:
        return {"insert_deduplication_token": name, "deduplicate_blocks_in_dependent_materialized_views": 1}

    def totals() -> tuple:
        return client.query("SELECT (SELECT count() FROM raw), (SELECT sum(cost_nano) FROM spend)").result_rows[0]

    batch = [["acme", 5], ["acme", 7], ["globex", 11]]
    client.insert("raw", batch, settings=token("usage.priced/0/0-2"))
    assert totals() == (3, 23)
    # the retry arrives through another client and connection, as after a sink crash
    await async_client.insert("raw", batch, settings=token("usage.priced/0/0-2"))
    client.insert("raw", batch, settings=token("usage.priced/0/0-2"))
    assert totals() == (3, 23)
    await async_client.insert("raw", [["acme", 100]], settings=token("usage.priced/0/3-3"))
    assert totals() == (4, 123)


def test_failing_materialized_view_fails_the_insert(server: EmbeddedClickHouse, client) -> None:
    # chDB's streaming insert reports success when a view fails; a server answers with the error
    client.command("CREATE TABLE src (n Int64) ENGINE = MergeTree ORDER BY n")
    client.command("CREATE TABLE dst (n Int64) ENGINE = MergeTree ORDER BY n")
    client.command("CREATE MATERIALIZED VIEW dst_mv TO dst AS SELECT n + throwIf(n = 13, 'unlucky') AS n FROM src")
    with pytest.raises(DatabaseError) as err:
        client.insert("src", [[n] for n in range(20)], column_names=["n"])
    assert err.value.code == 395  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    answer = httpx.post(
        server.url,
        params={"database": client.database, "query": "INSERT INTO src FORMAT JSONEachRow"},
        content=b'{"n": 12}\n{"n": 13}\n',
    )
    assert answer.status_code == 500
    assert answer.headers["X-ClickHouse-Exception-Code"] == "395"
    assert answer.text.startswith("Code: 395. DB::Exception: unlucky")
    client.insert("src", [[n] for n in range(3)], column_names=["n"])
    assert client.command("SELECT count() FROM dst") == 3


def test_split_insert_finds_where_data_starts() -> None:
    native = b"INSERT INTO t (`a`, `format`) FORMAT Native\n\x09\x01"
    assert split_insert(native, final=False) == InsertSplit("INSERT INTO t (`a`, `format`)", "Native", len(native) - 2)
    values = b"insert into t settings x='FORMAT' values (1, 'a;b')"
    assert split_insert(values, final=True) == InsertSplit(
        "insert into t settings x='FORMAT'", "Values", values.index(b" (1")
    )
    assert split_insert(b"INSERT INTO t SELECT * FROM s FORMAT Native", final=True) is None
    assert split_insert(b"SELECT 1 FORMAT Native", final=False) is None
    assert split_insert(b"INSERT INTO t FORMAT Nat", final=False) is NEED_MORE
    assert split_insert(b"INSERT INTO t /* FORMAT", final=False) is NEED_MORE


@pytest.mark.parametrize("blank_line", [False, True], ids=["whole-query", "streamed"])
def test_truncated_insert_body_commits_nothing(server: EmbeddedClickHouse, client, blank_line: bool) -> None:
    # data with a blank line takes chDB's streaming insert, the rest runs as one query (PendingInsert)
    client.command("CREATE TABLE cut (a Int64, s String) ENGINE = MergeTree ORDER BY a")
    text = "'\\n\\n'" if blank_line else "''"
    block = client.raw_query(f"SELECT number AS a, if(a = 500, {text}, '') AS s FROM numbers(1000)", fmt="Native")
    assert (b"\n\n" in block) == blank_line
    session = f"cut-{uuid.uuid4()}"
    query = f"INSERT INTO {client.database}.cut FORMAT Native"

    def session_error() -> str | None:
        # session_check: probing never creates the session the insert is about to open
        answer = httpx.post(server.url, params={"session_id": session, "session_check": 1}, content="SELECT 1")
        return answer.headers.get("X-ClickHouse-Exception-Code")

    def send_chunked(terminated: bool) -> None:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(
                f"POST /?session_id={session}&query={query.replace(' ', '%20')} HTTP/1.1\r\n"
                "Host: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                + f"{len(block):x}\r\n".encode()
                + block
                + b"\r\n"
                + (b"0\r\n\r\n" if terminated else b"")
            )
            if terminated:
                assert sock.recv(12) == b"HTTP/1.1 200"
                return
            while session_error() != "373":  # SESSION_IS_LOCKED: the server is inside the insert, data in hand
                pass
        # the connection dropped before the terminating chunk; the insert holds the session until cancelled
        while session_error() is not None:
            pass

    send_chunked(terminated=False)
    assert client.command("SELECT count() FROM cut") == 0
    send_chunked(terminated=True)
    assert client.command("SELECT count() FROM cut") == 1000


def test_basic_auth_when_credentials_are_configured(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_EMBEDDED_CH_USER", "spendstream")
    monkeypatch.setenv("SPENDSTREAM_EMBEDDED_CH_PASSWORD", "s3cret")
    with EmbeddedClickHouse(str(tmp_path / "auth")) as ch:
        assert httpx.get(ch.url + "/ping").text == "Ok.\n"  # health checks need no credentials
        with pytest.raises(DatabaseError) as err:
            clickhouse_connect.get_client(host=ch.host, port=ch.port, username="spendstream", password="wrong")
        assert err.value.code == 516
        c = clickhouse_connect.get_client(host=ch.host, port=ch.port, username="spendstream", password="s3cret")
        assert c.command("SELECT 1") == 1
        c.close()


def test_data_survives_kill_and_restart(server: EmbeddedClickHouse, database: str) -> None:
    c = clickhouse_connect.get_client(host=server.host, port=server.port, database=database)
    c.command(USAGE_DDL)
    c.insert("usage", _usage_rows(500), column_names=USAGE_COLUMNS)
    c.close()
    server.kill()
    server.start()
    c = clickhouse_connect.get_client(host=server.host, port=server.port, database=database)
    assert c.command("SELECT count() FROM usage") == 500
    c.insert("usage", _usage_rows(100, 500), column_names=USAGE_COLUMNS)
    c.close()
    server.restart()
    c = clickhouse_connect.get_client(host=server.host, port=server.port, database=database)
    assert c.query("SELECT count(), max(tokens) FROM usage WHERE model = 'gpt-4o'").result_rows[0] == (200, 597_000)
    c.close()


def test_insert_select_from_input_is_refused_not_silently_empty(server, client, database):
    """chDB would answer 200 and store nothing; the server must say it cannot."""
    client.command("CREATE TABLE input_probe (n UInt32) ENGINE = MergeTree ORDER BY n")
    resp = httpx.post(
        server.url,
        params={
            "database": database,
            "query": "INSERT INTO input_probe SELECT n FROM input('n UInt32') FORMAT JSONEachRow",
        },
        content=b'{"n": 1}\n{"n": 2}\n',
    )
    assert resp.status_code >= 400
    assert resp.headers["X-ClickHouse-Exception-Code"] == "48"
    assert "input()" in resp.text
    assert client.query("SELECT count() FROM input_probe").result_rows == [(0,)]
