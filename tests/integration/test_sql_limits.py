"""POST /v1/sql runs every statement under the configured ClickHouse limits, and passing one is a
400 naming `sql` (never a 500); a tenant's statements at once are capped per process (429)."""

from __future__ import annotations

import threading
import time

import pytest
from query_api_stack import QueryApiServer, migrate  # pytest puts tests/integration on sys.path

from spendstream.clickhouse import get_client
from spendstream.keys import create_key

pytestmark = pytest.mark.clickhouse

SMALL_LIMITS = {
    "sql_max_rows": 1000,
    "sql_max_rows_to_read": 1_000_000,
    "sql_max_bytes_to_read": 4_000_000,  # numbers() reads 8 bytes a row: 500,000 rows
    "sql_max_memory_bytes": 20_000_000,
    "sql_max_result_bytes": 100_000,
    "sql_max_threads": 3,
    "sql_max_seconds": 5.0,
}


@pytest.fixture(scope="module")
def small(make_settings):
    settings = make_settings(query_api=SMALL_LIMITS)
    migrate(settings)
    admin = get_client(settings)
    try:
        _, key = create_key(admin, "tenant_l", ["read"], "limits")
    finally:
        admin.close()
    with QueryApiServer(settings) as server, server.client(key) as client:
        yield client


def sql(client, statement: str, **extra):
    return client.post("/v1/sql", json={"sql": statement, **extra})


def test_every_statement_carries_the_limits_as_settings(small):
    names = [
        "readonly", "max_threads", "max_memory_usage", "max_rows_to_read", "max_bytes_to_read", "max_result_rows",
        "max_result_bytes", "result_overflow_mode", "read_overflow_mode", "max_execution_time", "log_comment",
    ]  # fmt: skip
    r = sql(small, "SELECT " + ", ".join(f"toString(getSetting('{n}')) AS {n}" for n in names))
    assert r.status_code == 200, r.text
    got = dict(zip(names, r.json()["rows"][0]))
    assert got == {
        "readonly": "1", "max_threads": "3", "max_memory_usage": "20000000", "max_rows_to_read": "1000000",
        "max_bytes_to_read": "4000000", "max_result_rows": "1000", "max_result_bytes": "100000",
        "result_overflow_mode": "throw", "read_overflow_mode": "throw", "max_execution_time": "5",
        "log_comment": "tenant_l",
    }  # fmt: skip


@pytest.mark.parametrize(
    "statement, limit",
    [
        ("SELECT number FROM numbers(5000)", "the result row limit"),
        ("SELECT repeat(toString(number), 1000) AS s FROM numbers(200)", "the result size limit"),
        ("SELECT count() FROM numbers(2000000)", "the rows-to-read limit"),
        ("SELECT sum(number) FROM numbers(600000)", "the bytes-to-read limit"),
        ("SELECT length(groupArray(repeat('x', 100))) FROM numbers(400000)", "the memory limit"),
        # evaluated while the statement is analysed, before it runs: the same limits hold there
        ("SELECT (SELECT count() FROM numbers(2000000)) AS n", "the rows-to-read limit"),
    ],
)
def test_passing_a_limit_is_a_400_naming_sql(small, statement, limit):
    r = sql(small, statement)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "query_failed" and body["field"] == "sql", body
    assert limit in body["message"], body["message"]
    assert "Code:" not in body["message"]


def test_max_rows_asks_for_the_first_rows_instead(small):
    r = sql(small, "SELECT number FROM numbers(5000) ORDER BY number", max_rows=10)
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[i] for i in range(10)] and r.json()["truncated"] is True
    # more than the server's limit: capped to it
    r = sql(small, "SELECT number FROM numbers(5000)", max_rows=100_000)
    assert r.status_code == 200 and r.json()["row_count"] == 1000 and r.json()["truncated"] is True
    # exactly at the limit: all of it, not truncated
    r = sql(small, "SELECT number FROM numbers(1000)")
    assert r.status_code == 200 and r.json()["row_count"] == 1000 and r.json()["truncated"] is False


@pytest.fixture(scope="module")
def one_at_a_time(make_settings):
    settings = make_settings(
        query_api={"sql_max_concurrent_per_tenant": 1, "sql_max_seconds": 2.0, "sql_max_threads": 1}
    )
    migrate(settings)
    admin = get_client(settings)
    try:
        _, key_b = create_key(admin, "tenant_b", ["read"], "b")
        _, key_c = create_key(admin, "tenant_c", ["read"], "c")
    finally:
        admin.close()
    with (
        QueryApiServer(settings) as server,
        server.client(key_b) as b,
        server.client(key_c) as c,
        server.client(key_b) as b2,
    ):
        yield b, b2, c


def test_a_tenant_over_its_concurrency_limit_gets_429(one_at_a_time):
    b, b2, c = one_at_a_time
    slow: dict = {}

    def run_slow() -> None:
        # about 2 s of one core, then the time limit
        slow["response"] = sql(b, "SELECT sum(cityHash64(number)) FROM numbers(5000000000)")

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.5)  # its checks take milliseconds: by now it runs, holding the tenant's one slot
    refused = sql(b2, "SELECT 1 AS one")
    other_tenant = sql(c, "SELECT 1 AS one")
    thread.join(30)
    assert slow["response"].status_code == 400 and "time limit" in slow["response"].json()["message"], slow[
        "response"
    ].text
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "too_many_queries" and refused.json()["field"] == "sql"
    assert other_tenant.status_code == 200, other_tenant.text  # the limit is per tenant
    # the slot is free again once the slow statement ended
    assert sql(b2, "SELECT 1 AS one").status_code == 200


def test_an_int128_sum_beyond_64_bits_comes_back_exact(small):
    # the aggregates' cost sums are Int128: wider than any integer orjson can write
    r = sql(small, "SELECT toInt128(4) * toInt128(9223372036854775807) AS wide, 1 AS narrow")
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[str(4 * (2**63 - 1)), 1]]
