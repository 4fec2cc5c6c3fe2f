"""POST /v1/sql against statements that try to read outside the tenant views: each is refused, and
ClickHouse never evaluated any of it, not even while the guard analysed it.

Proof of non-evaluation, two ways:
- a probe: another database holds a table with the URL engine pointing at an HTTP server of this
  test, so any read of it (a scalar subquery, IN, EXISTS, a join, url()) shows up as a request there;
  a control shows the analysis step does evaluate such reads when nothing stops them first;
- a recording proxy between the query API and ClickHouse: the statements refused by the text check
  never reach ClickHouse at all, not even its parser.
A secret table beside the probe holds a known value no answer may contain.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from aiohttp import ClientSession, web
from query_api_stack import (  # pytest puts tests/integration on sys.path
    QueryApiServer,
    insert_events,
    make_events,
    migrate,
)

from query_api.errors import QueryRefused
from query_api.sqlguard import check_ast, cte_names
from spendstream.clickhouse import get_client
from spendstream.keys import create_key
from spendstream.ports import free_port

pytestmark = pytest.mark.clickhouse

START, END = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 2, tzinfo=UTC)
SECRET_VALUE = "TOPSECRET-42"
PROBE_ANSWER = "probe-value"


class Probe:
    """An HTTP server counting the requests ClickHouse makes when something reads the probe table."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        probe = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                probe.hits.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(PROBE_ANSWER.encode() + b"\n")

            def do_HEAD(self) -> None:
                probe.hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/probe"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RecordingProxy:
    """ClickHouse's HTTP interface passed through unchanged, recording what each request carried."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []  # URL parameters (param_* included) and uncompressed bodies
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ch-proxy", daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        self._runner = web.ServerRunner(web.Server(self._forward))
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        text = "" if request.headers.get("Content-Encoding") else body.decode("utf-8", "replace")
        self.requests.append(" ".join([*(f"{k}={v}" for k, v in request.query.items()), text]))
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            passed = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=answer.status, body=payload, headers=passed)


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    server = Probe()
    yield server
    server.close()


@pytest.fixture(scope="module")
def hostile(make_settings, unique_name, probe):
    settings = make_settings(bootstrap_admin_key="ss_bootstrap_hostile_" + "k" * 20, bootstrap_tenant="ops")
    migrate(settings)
    insert_events(settings, make_events("tenant_b", 50, START, END, seed=5, prefix="bee"))
    secret_db = unique_name("secretdb")
    admin = get_client(settings)
    try:
        _, key_b = create_key(admin, "tenant_b", ["read"], "b")
        admin.command(f"CREATE DATABASE {secret_db}")
        admin.command(f"CREATE TABLE {secret_db}.secret (v String) ENGINE = Memory")
        admin.command(f"INSERT INTO {secret_db}.secret VALUES ('{SECRET_VALUE}')")
        admin.command(f"CREATE TABLE {secret_db}.probe (v String) ENGINE = URL('{probe.url}', 'LineAsString')")
        with RecordingProxy(settings.clickhouse_url) as proxy:
            proxied = settings.model_copy(
                update={"clickhouse": settings.clickhouse.model_copy(update={"url": proxy.url})}
            )
            with QueryApiServer(proxied) as server, server.client(key_b) as client:
                yield {"settings": settings, "admin": admin, "client": client, "db": secret_db, "proxy": proxy}
    finally:
        admin.close()


# {s}: the secret database, {url}: the probe's URL. Every one names the secret database or the probe.
HOSTILE = [
    # reads the analysis step would evaluate
    "SELECT (SELECT any(v) FROM {s}.probe) AS x",
    "SELECT count() FROM usage_events WHERE tenant IN {s}.probe",
    "SELECT count() FROM usage_events WHERE tenant IN ({s}.probe)",
    "SELECT count() FROM usage_events WHERE tenant IN ({s}.probe AS p)",
    "SELECT in('x', {s}.probe)",
    "SELECT notIn('x', ({s}.probe))",
    "SELECT count() FROM usage_events WHERE tenant GLOBAL NOT IN {s}.probe",
    "SELECT count() FROM usage_events WHERE NOT EXISTS (SELECT 1 FROM {s}.probe)",
    "SELECT count() FROM usage_events WHERE tenant IN (SELECT v FROM {s}.probe UNION ALL SELECT 'x')",
    "SELECT tenant FROM usage_events WHERE (tenant, 1) IN {s}.secret",
    # joins and subqueries
    "SELECT count() FROM usage_events AS e JOIN {s}.probe AS p ON e.project = p.v",
    "SELECT count() FROM usage_events AS e, {s}.probe AS p",
    "SELECT * FROM (SELECT * FROM {s}.probe)",
    "FROM {s}.probe SELECT v",
    # CTEs, one shadowing a view's name
    "WITH usage_events AS (SELECT v FROM {s}.probe) SELECT * FROM usage_events",
    "WITH p AS (SELECT * FROM usage_events) SELECT * FROM p WHERE 'x' IN {s}.probe",
    # table functions and functions reading elsewhere
    "SELECT * FROM url('{url}', 'LineAsString')",
    "SELECT count() FROM usage_events WHERE tenant IN (SELECT * FROM url('{url}', 'LineAsString'))",
    "SELECT * FROM remote('127.0.0.1', {s}.probe)",
    "SELECT * FROM merge('{s}', '.*')",
    "SELECT * FROM loop({s}.probe)",
    "SELECT * FROM view(SELECT * FROM {s}.probe)",
    "SELECT dictGet('{s}.secret', 'v', 1)",
    "SELECT joinGet('{s}.secret', 'v', 'x')",
    "SELECT hasColumnInTable('{s}', 'secret', 'v')",
    # quoting, comments and whitespace
    "SELECT * FROM `{s}`.`probe`",
    'SELECT * FROM "{s}"."probe"',
    "SELECT * FROM {s} . probe",
    "SELECT * FROM {s}/* a comment */.probe",
    "SELECT 1 AS one -- a comment ends at the line's end\nFROM {s}.probe",
    "SELECT 1 AS one # a MySQL-style comment\nFROM {s}.probe",
    "SELECT 'FROM usage_events' AS x FROM {s}.probe",
    "SELECT 'it''s', (SELECT any(v) FROM {s}.probe)",
    "SELECT 'x\\'', (SELECT any(v) FROM {s}.probe)",
    "SELECT $$ FROM usage_events $$ AS x, (SELECT any(v) FROM {s}.probe)",
    "SELECT /* /* nested */ still a comment */ (SELECT any(v) FROM {s}.probe)",
    "SELECT * FROM\u00a0{s}.probe",
    "SELECT * FROM {s}\u2003.probe",
    # other databases, several statements
    "SELECT * FROM system.tables WHERE database = '{s}'",
    "SELECT * FROM INFORMATION_SCHEMA.TABLES WHERE table_schema = '{s}'",
    "SELECT * FROM information_schema.columns WHERE table_schema = '{s}'",
    "SELECT 1; SELECT * FROM {s}.probe",
]


def _statement(template: str, db: str, probe: Probe) -> str:
    return template.replace("{s}", db).replace("{url}", probe.url)


def test_the_probe_sees_reads_and_analysis_evaluates_them(hostile, probe):
    """The controls: reading the probe table shows up at the probe, and so does merely analysing a
    statement with a scalar subquery over it, which is why the guard must refuse before analysis."""
    admin, db = hostile["admin"], hostile["db"]
    before = len(probe.hits)
    assert admin.query(f"SELECT v FROM {db}.probe").result_rows == [(PROBE_ANSWER,)]
    assert len(probe.hits) > before
    before = len(probe.hits)
    admin.raw_query(f"EXPLAIN QUERY TREE SELECT (SELECT any(v) FROM {db}.probe)")
    assert len(probe.hits) > before


def test_the_proxy_sees_what_the_query_api_sends(hostile):
    proxy = hostile["proxy"]
    before = len(proxy.requests)
    r = hostile["client"].post("/v1/sql", json={"sql": "SELECT count() AS n FROM usage_events"})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[50]]
    sent = proxy.requests[before:]
    assert sum("usage_events" in s for s in sent) >= 4  # parse, syntax tree, analysis, run


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_sql_is_refused_before_clickhouse_sees_it(hostile, probe, template):
    statement = _statement(template, hostile["db"], probe)
    proxy = hostile["proxy"]
    hits, sent = len(probe.hits), len(proxy.requests)
    r = hostile["client"].post("/v1/sql", json={"sql": statement})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["error"] == "query_refused" and body["field"] == "sql", body
    assert SECRET_VALUE not in r.text and PROBE_ANSWER not in r.text
    assert "Code:" not in r.text and "DB::Exception" not in r.text
    assert probe.hits[hits:] == [], "ClickHouse read the probe"
    leaked = [s for s in proxy.requests[sent:] if hostile["db"] in s or f":{probe.port}/" in s]
    assert leaked == [], "the statement reached ClickHouse"


@pytest.mark.parametrize("template", [t for t in HOSTILE if ";" not in t])
def test_the_syntax_tree_check_refuses_them_on_its_own(hostile, probe, template):
    """Defence in depth: were the text check fooled, ClickHouse's own parse (which evaluates
    nothing) refuses every one too."""
    settings, admin = hostile["settings"], hostile["admin"]
    tenant_db = f"{settings.clickhouse.database}_tenant"
    statement = _statement(template, hostile["db"], probe)
    hits = len(probe.hits)
    canonical = admin.query("SELECT formatQuerySingleLine({sql:String})", parameters={"sql": statement}).result_rows[0][
        0
    ]
    lines = admin.raw_query(f"EXPLAIN AST {canonical}").decode().splitlines()
    with pytest.raises(QueryRefused):
        check_ast(lines, tenant_db, cte_names(canonical), frozenset({settings.clickhouse.database}))
    assert probe.hits[hits:] == []


ALLOWED = [
    # what analysts write: must keep working, and never touch the probe
    "SELECT toDate(timestamp) AS day, count() AS n FROM usage_events GROUP BY day ORDER BY day",
    "SELECT extract(DAY FROM timestamp) AS d, trim(BOTH ' ' FROM project) AS p FROM usage_events LIMIT 1",
    "SELECT position('proj' IN project) AS at FROM usage_events WHERE user IS NOT DISTINCT FROM user LIMIT 1",
    "WITH recent AS (SELECT * FROM usage_events) SELECT count() FROM recent WHERE project IN (SELECT project FROM recent)",
    "SELECT count() FROM usage_events AS e, usage_daily AS d WHERE e.project = d.project",
    "SELECT e.project FROM usage_events AS e ARRAY JOIN [1, 2] AS k LIMIT 2",
    "FROM usage_events SELECT count()",
    "SELECT count() FROM usage_events WHERE project IN ('bee-proj-0', 'bee-proj-1')",
    "SELECT (SELECT count() FROM usage_daily) AS days, 'FROM system.tables' AS text",
    "SELECT number FROM numbers(3) WHERE number IN (SELECT number FROM numbers(1))",
]


@pytest.mark.parametrize("statement", ALLOWED)
def test_ordinary_sql_still_runs(hostile, probe, statement):
    hits = len(probe.hits)
    r = hostile["client"].post("/v1/sql", json={"sql": statement})
    assert r.status_code == 200, r.text
    assert probe.hits[hits:] == []


def test_analysis_errors_say_what_is_wrong_not_what_clickhouse_saw(hostile):
    client = hostile["client"]
    r = client.post("/v1/sql", json={"sql": "SELECT no_such_column FROM usage_events"})
    body = r.json()
    assert r.status_code == 400 and body["field"] == "sql" and body["error"] == "query_refused"
    assert body["message"] == "unknown column or alias `no_such_column` (UNKNOWN_IDENTIFIER)"
    # ClickHouse's own text would quote types and scopes; the analyst gets the error's name and our words
    r = client.post("/v1/sql", json={"sql": "SELECT sum(project) FROM usage_events"})
    assert r.status_code == 400 and r.json()["field"] == "sql"
    assert r.json()["message"] == "a function got an argument of a type it does not take (ILLEGAL_TYPE_OF_ARGUMENT)"
    r = client.post("/v1/sql", json={"sql": "SELECT * FROM zeros(3)"})
    assert r.status_code == 400 and "table function zeros()" in r.json()["message"]
    r = client.post("/v1/sql", json={"sql": "SELECT count() FROMM usage_events"})
    assert r.status_code == 400
    assert r.json()["message"].startswith("syntax error at position 22 (near 'usage_events')"), r.json()["message"]
