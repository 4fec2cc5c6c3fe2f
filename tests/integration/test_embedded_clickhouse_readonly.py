"""The embedded ClickHouse honours `readonly` and the query limits a request carries, as a server
does: these are the settings the query API relies on to confine analysts' SQL. Every expectation
here is a ClickHouse server's behaviour, so the tests also pass against an external server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.clickhouse

READONLY = "164"


@pytest.fixture(scope="module")
def ch(clickhouse_url: str) -> Iterator[tuple[httpx.Client, str]]:
    database = f"ro_{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=clickhouse_url, timeout=30) as client:
        for statement in (
            f"CREATE DATABASE {database}",
            f"CREATE TABLE {database}.t (a Int64) ENGINE = MergeTree ORDER BY a",
            f"INSERT INTO {database}.t SELECT number FROM numbers(100)",
        ):
            client.post("/", content=statement).raise_for_status()
        yield client, database
        client.post("/", content=f"DROP DATABASE {database}").raise_for_status()


def post(client: httpx.Client, statement: str, **params: str) -> httpx.Response:
    return client.post("/", params=params, content=statement)


def refused_as_readonly(r: httpx.Response) -> bool:
    return r.status_code != 200 and r.headers.get("X-ClickHouse-Exception-Code") == READONLY


def test_readonly_1_refuses_writes_and_any_settings_change(ch):
    client, db = ch
    for statement in (
        f"INSERT INTO {db}.t VALUES (1000)",
        f"INSERT INTO {db}.t SELECT 1000",
        f"CREATE TABLE {db}.t2 (a Int8) ENGINE = Memory",
        f"ALTER TABLE {db}.t DELETE WHERE 1",
        f"TRUNCATE TABLE {db}.t",
        f"DROP TABLE {db}.t",
        f"OPTIMIZE TABLE {db}.t FINAL",
        "CREATE TEMPORARY TABLE tmp (a Int8)",
        "SYSTEM DROP DNS CACHE",
        "SET max_threads = 1",
        "SET readonly = 0",
        "SELECT 1 SETTINGS max_threads = 1",
        "SELECT getSetting('log_comment') SETTINGS log_comment = 'someone else'",
    ):
        r = post(client, statement, readonly="1", database=db)
        assert refused_as_readonly(r), (statement, r.status_code, r.text)
    assert post(client, "SELECT count(), sum(a) FROM t", readonly="1", database=db).text == "100\t4950\n"
    assert post(client, f"EXISTS TABLE {db}.t2").text == "0\n"


def test_readonly_2_allows_settings_changes_but_not_of_readonly(ch):
    client, db = ch
    r = post(client, "SELECT getSetting('max_threads') SETTINGS max_threads = 1", readonly="2")
    assert (r.status_code, r.text) == (200, "1\n")
    assert post(client, "SET max_threads = 1", readonly="2").status_code == 200
    for statement in ("SELECT 1 SETTINGS readonly = 0", "SET readonly = 0", f"INSERT INTO {db}.t VALUES (1000)"):
        r = post(client, statement, readonly="2")
        assert refused_as_readonly(r), (statement, r.text)
    # GET implies readonly = 2, as on a server
    r = client.get(
        "/", params={"query": "SELECT getSetting('readonly'), getSetting('max_threads') SETTINGS max_threads = 1"}
    )
    assert (r.status_code, r.text) == (200, "2\t1\n")
    assert refused_as_readonly(client.get("/", params={"query": f"INSERT INTO {db}.t VALUES (1000)"}))


def test_the_request_settings_apply_along_with_readonly(ch):
    """A server applies a request's settings together, readonly among them: the limits and the
    tenant in log_comment hold, and the statement itself cannot change them."""
    client, _ = ch
    r = post(client, "SELECT getSetting('log_comment'), getSetting('readonly')", readonly="1", log_comment="tenant_x")
    assert (r.status_code, r.text) == (200, "tenant_x\t1\n")


@pytest.mark.parametrize(
    "statement, settings, code",
    [
        ("SELECT number FROM numbers(10)", {"max_result_rows": "5", "result_overflow_mode": "throw"}, "396"),
        (
            "SELECT toString(number) FROM numbers(100000)",
            {"max_result_bytes": "10000", "result_overflow_mode": "throw"},
            "396",
        ),
        ("SELECT count() FROM numbers(2000000)", {"max_rows_to_read": "1000000"}, "158"),
        ("SELECT sum(number) FROM numbers(600000)", {"max_bytes_to_read": "4000000"}, "307"),
        ("SELECT length(groupArray(repeat('x', 100))) FROM numbers(400000)", {"max_memory_usage": "20000000"}, "241"),
        (
            "SELECT sum(cityHash64(number)) FROM numbers(100000000000)",
            {"max_execution_time": "0.5", "timeout_overflow_mode": "throw", "max_threads": "1"},
            "159",
        ),
    ],
)
@pytest.mark.parametrize("wait", ["0", "1"])
def test_limit_settings_are_enforced(ch, statement, settings, code, wait):
    client, _ = ch
    r = post(client, statement, readonly="1", wait_end_of_query=wait, **settings)
    assert r.status_code != 200 and r.headers.get("X-ClickHouse-Exception-Code") == code, r.text


def test_limit_and_threads_settings_are_applied(ch):
    client, _ = ch
    r = post(client, "SELECT number FROM numbers(10)", readonly="1", limit="3")
    assert r.text == "0\n1\n2\n"
    r = post(client, "SELECT getSetting('max_threads')", readonly="1", max_threads="3")
    assert r.text == "3\n"


def test_readonly_in_a_session_holds_for_that_request_only(ch):
    client, db = ch
    session = {"session_id": f"s-{uuid.uuid4().hex}"}
    post(client, f"CREATE TABLE {db}.s (a Int8) ENGINE = Memory").raise_for_status()
    for statement in (
        f"INSERT INTO {db}.s VALUES (1)",
        "SET max_threads = 1",
        "SELECT 1 SETTINGS max_threads = 1",
        "CREATE TEMPORARY TABLE tmp (a Int8)",
    ):
        assert refused_as_readonly(post(client, statement, readonly="1", **session)), statement
    assert refused_as_readonly(post(client, "SET readonly = 0", readonly="2", **session))
    assert refused_as_readonly(post(client, "SELECT 1 SETTINGS readonly = 0", readonly="2", **session))
    # readonly = 2 lets the session change its settings, and they stick as a session's SET does
    assert post(client, "SET max_threads = 1", readonly="2", **session).status_code == 200
    assert post(client, "SELECT getSetting('max_threads')", **session).text == "1\n"
    # the session itself is not left read-only
    post(client, f"INSERT INTO {db}.s VALUES (1)", **session).raise_for_status()
    assert post(client, f"SELECT count() FROM {db}.s", **session).text == "1\n"


def test_into_outfile_is_refused_over_http(ch, tmp_path: Path):
    client, _ = ch
    target = tmp_path / "out.tsv"
    for params in ({}, {"readonly": "1"}):
        r = post(client, f"SELECT 1 INTO OUTFILE '{target}'", **params)
        assert r.status_code != 200 and r.headers.get("X-ClickHouse-Exception-Code") == "358", r.text
    assert not target.exists()
