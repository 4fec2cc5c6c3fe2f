"""Every endpoint's body limit: 413 with a JSON body naming ``body``, enforced while the body
streams in (a larger Content-Length is refused unread; a body without one, or longer than it
declared, as soon as it passes the limit), on both services; and gzip bodies of several members
decoded whole at the gateway, bounded by the same limit once decoded.

The gateway runs in-process on the embedded broker (its budget check reading the embedded
ClickHouse); the query API is served over real HTTP by uvicorn, so chunked bodies cross a socket.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
from gateway_support import events_by_id, gateway, raw_position, read_raw, wait_until  # tests/integration on sys.path
from query_api_stack import QueryApiServer, migrate

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

ADMIN = "ss_test_admin_" + "g" * 24
EVENTS_LIMIT, CHECK_LIMIT, QUERY_LIMIT = 8192, 2048, 4096
CHUNK = 1024
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


class CountingBody:
    """A body streamed in CHUNK-sized chunks, counting those the server pulled."""

    def __init__(self, size: int):
        self.chunks, self.pulled = size // CHUNK, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b" " * CHUNK


def chunks(size: int) -> Iterator[bytes]:
    for _ in range(size // CHUNK):
        yield b" " * CHUNK


def event(i: int) -> dict:
    return {"event_id": f"gz-{i}", "project": "limits", "model": "openai/gpt-4o", "input_tokens": i, "output_tokens": 1}


def too_large(answer: httpx.Response) -> None:
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == "body_too_large" and answer.json()["field"] == "body"


@pytest.fixture(scope="module")
def settings(make_settings, unique_name):
    settings = make_settings(
        bootstrap_admin_key=ADMIN, bootstrap_tenant=unique_name("limits"),
        gateway={"max_body_bytes": EVENTS_LIMIT, "max_check_body_bytes": CHECK_LIMIT},
        query_api={"max_body_bytes": QUERY_LIMIT},
    )  # fmt: skip
    migrate(settings)
    return settings


@pytest.fixture(scope="module")
async def gw(settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(settings, ADMIN) as client:

        async def budgets_loaded() -> bool:
            return client.app.state.budget_view.ready  # type: ignore[attr-defined]

        await wait_until(budgets_loaded, timeout=30)
        yield client


# ---------------------------------------------------------------- gateway


@pytest.mark.parametrize(("path", "limit"), [("/v1/events", EVENTS_LIMIT), ("/v1/budgets/check", CHECK_LIMIT)])
async def test_gateway_refuses_a_declared_length_over_the_limit_unread(gw, path, limit):
    body = CountingBody(64 * limit)
    too_large(await gw.post(path, content=body, headers={**JSON, "Content-Length": str(64 * limit)}))
    assert body.pulled == 0


@pytest.mark.parametrize(("path", "limit"), [("/v1/events", EVENTS_LIMIT), ("/v1/budgets/check", CHECK_LIMIT)])
@pytest.mark.parametrize("declared", [None, "100"], ids=["chunked", "lying-content-length"])
async def test_gateway_refuses_a_streamed_body_once_past_the_limit(gw, path, limit, declared):
    body = CountingBody(64 * limit)
    headers = JSON if declared is None else {**JSON, "Content-Length": declared}
    too_large(await gw.post(path, content=body, headers=headers))
    assert body.pulled == limit // CHUNK + 1  # the chunk that passed the limit was the last one read


async def test_gateway_bodies_of_the_limit_itself_are_served(gw, settings):
    events = orjson.dumps([event(0)])
    padded = events[:-1] + b" " * (EVENTS_LIMIT - len(events)) + b"]"
    answer = await gw.post("/v1/events", content=padded, headers=JSON)
    assert answer.status_code == 202 and answer.json()["accepted"] == 1, answer.text
    check = orjson.dumps({"scope": {"project": "limits"}})
    answer = await gw.post("/v1/budgets/check", content=check + b" " * (CHECK_LIMIT - len(check)), headers=JSON)
    assert answer.status_code == 200 and answer.json()["allowed"] is True, answer.text


async def test_every_gzip_member_is_published(gw, settings):
    members = [b"\n".join(orjson.dumps(event(i)) for i in range(start, start + 20)) + b"\n" for start in (0, 20, 40)]
    since = await raw_position(settings)
    body = b"".join(gzip.compress(m) for m in members)
    answer = await gw.post("/v1/events", content=body, headers={**NDJSON, "Content-Encoding": "gzip"})
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 60 and answer.json()["rejected"] == []
    published = events_by_id(await read_raw(settings, settings.bootstrap_tenant, 60, since))
    assert {f"gz-{i}" for i in range(60)} <= set(published)


async def test_gzip_members_are_bounded_together_once_decoded(gw):
    member = gzip.compress(b"\n" * (EVENTS_LIMIT // 2 + 1))  # two of them pass the limit, one does not
    too_large(await gw.post("/v1/events", content=member * 2, headers={**NDJSON, "Content-Encoding": "gzip"}))


@pytest.mark.parametrize(
    "tail", [b"trailing garbage", gzip.compress(orjson.dumps(event(1)))[:-6]], ids=["garbage", "truncated-member"]
)
async def test_a_bad_gzip_member_is_400_naming_the_body(gw, tail):
    body = gzip.compress(orjson.dumps(event(0)) + b"\n") + tail
    answer = await gw.post("/v1/events", content=body, headers={**NDJSON, "Content-Encoding": "gzip"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_gzip" and answer.json()["field"] == "body"
    assert "accepted" not in answer.json()


# ---------------------------------------------------------------- query API (real HTTP)


@pytest.fixture(scope="module")
def api(settings) -> Iterator[httpx.Client]:
    with QueryApiServer(settings) as server, server.client(ADMIN) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/projects"), ("POST", "/v1/sql"), ("GET", "/v1/analytics/overview"), ("POST", "/healthz")],
)
def test_query_api_refuses_bodies_over_the_limit_on_every_route(api, method, path):
    declared = api.request(method, path, content=b"{" + b" " * (4 * QUERY_LIMIT) + b"}", headers=JSON)
    too_large(declared)
    streamed = api.request(method, path, content=chunks(64 * QUERY_LIMIT), headers=JSON)  # chunked, no length
    assert "content-length" not in streamed.request.headers
    too_large(streamed)
    assert api.get("/healthz").status_code == 200  # the connection is still good after a refusal


def test_query_api_bodies_under_the_limit_reach_the_route(api):
    description = "d" * 2000
    body = orjson.dumps({"id": "limits-p1", "name": "Limits", "description": description})
    created = api.post("/v1/projects", content=iter([body[:1000], body[1000:]]), headers=JSON)  # two chunks
    assert created.status_code == 201, created.text
    assert api.get("/v1/projects/limits-p1").json()["description"] == description
