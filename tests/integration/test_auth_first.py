"""Both services check the API key before they read a byte of the body: a request without a valid
key is answered 401 whatever it sends (malformed JSON, a body over the limit with or without
Content-Length, no Content-Type), never the 400/413/415/422 the same body gets with a valid key.

The real apps with their lifespans (gateway on the embedded broker, both services' keys and the
query API on the embedded ClickHouse), called through ASGI so that a streamed body can count the
chunks the app pulled from it: none for a 401.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from gateway_support import gateway, wait_until  # tests/integration is on sys.path
from query_api_stack import migrate

from query_api.app import create_app as create_query_api

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

ADMIN = "ss_test_admin_" + "f" * 24
LIMIT = 4096  # every body limit of this module: the gateway's events and check, the query API's
MALFORMED = b'{"project": "p", "model": '
JSON = {"Content-Type": "application/json"}
NO_KEYS = {
    "none": {},
    "wrong-bearer": {"Authorization": "Bearer not-a-key"},
    "unknown-x-api-key": {"X-API-Key": "ss_0123456789abcdef_" + "z" * 30},
}


class CountingBody:
    """A body streamed in chunks (httpx sends it chunked, without Content-Length), counting pulls."""

    def __init__(self, size: int, chunk: int = 1024):
        self.chunks, self.chunk, self.pulled = size // chunk, b"x" * chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk


#: name -> (body, headers); each call makes a fresh body
BODIES: dict[str, Callable[[], tuple[Any, dict[str, str]]]] = {
    "malformed-json": lambda: (MALFORMED, JSON),
    "over-limit": lambda: (b"[" + b" " * (4 * LIMIT) + b"]", JSON),
    "chunked-over-limit": lambda: (CountingBody(64 * LIMIT), JSON),
    "no-content-type": lambda: (MALFORMED, {}),
}

#: (service, path) -> body name -> (status, error) with a valid key: what the 401 stands in front of
WITH_KEY = {
    ("gateway", "/v1/events"): {
        "malformed-json": (400, "malformed_json"), "over-limit": (413, "body_too_large"),
        "chunked-over-limit": (413, "body_too_large"), "no-content-type": (415, "unsupported_media_type"),
    },
    ("gateway", "/v1/budgets/check"): {
        "malformed-json": (422, "invalid_field"), "over-limit": (413, "body_too_large"),
        "chunked-over-limit": (413, "body_too_large"), "no-content-type": (422, "invalid_field"),
    },
    ("query_api", "/v1/projects"): {
        "malformed-json": (422, "invalid_field"), "over-limit": (413, "body_too_large"),
        "chunked-over-limit": (413, "body_too_large"), "no-content-type": (422, "invalid_field"),
    },
    ("query_api", "/v1/sql"): {
        "malformed-json": (422, "invalid_field"), "over-limit": (413, "body_too_large"),
        "chunked-over-limit": (413, "body_too_large"), "no-content-type": (422, "invalid_field"),
    },
}  # fmt: skip
UNAUTHENTICATED = {"gateway": "unauthenticated", "query_api": "unauthorized"}


@pytest.fixture(scope="module")
def settings(make_settings, unique_name):
    settings = make_settings(
        bootstrap_admin_key=ADMIN, bootstrap_tenant=unique_name("auth"),
        gateway={"max_body_bytes": LIMIT, "max_check_body_bytes": LIMIT}, query_api={"max_body_bytes": LIMIT},
    )  # fmt: skip
    migrate(settings)
    return settings


@asynccontextmanager
async def query_api(settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_query_api(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://query-api", timeout=30) as c:
            yield c


@pytest.fixture(scope="module")
async def clients(settings) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    async with gateway(settings) as gw, query_api(settings) as qa:

        async def budgets_loaded() -> bool:
            return gw.app.state.budget_view.ready  # type: ignore[attr-defined]

        await wait_until(budgets_loaded, timeout=30)  # else the check answers 503 before reading a body
        yield {"gateway": gw, "query_api": qa}


CASES = [(service, path, body) for (service, path), bodies in WITH_KEY.items() for body in bodies]


@pytest.mark.parametrize("key", sorted(NO_KEYS))
@pytest.mark.parametrize(("service", "path", "body"), CASES)
async def test_no_valid_key_is_401_whatever_the_body(clients, service, path, body, key):
    content, headers = BODIES[body]()
    answer = await clients[service].post(path, content=content, headers={**headers, **NO_KEYS[key]})
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == UNAUTHENTICATED[service]
    assert answer.headers["www-authenticate"] == "Bearer"
    if isinstance(content, CountingBody):
        assert content.pulled == 0  # not a byte of the body was read


@pytest.mark.parametrize(("service", "path", "body"), CASES)
async def test_with_a_valid_key_the_same_body_gets_its_own_answer(clients, service, path, body):
    content, headers = BODIES[body]()
    answer = await clients[service].post(path, content=content, headers={**headers, "Authorization": f"Bearer {ADMIN}"})
    status, error = WITH_KEY[(service, path)][body]
    assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    if status == 413:
        assert answer.json()["field"] == "body"
    if isinstance(content, CountingBody):
        assert content.pulled <= LIMIT // len(content.chunk) + 1  # refused once past the limit


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/", "/static/app.js"])
async def test_the_query_api_open_routes_stay_open(clients, path):
    answer = await clients["query_api"].get(path)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
async def test_the_gateway_open_routes_stay_open(clients, path):
    assert (await clients["gateway"].get(path)).status_code == 200


async def test_a_valid_key_without_the_scope_is_403_on_both_services(clients, settings):
    from spendstream.clickhouse import get_client
    from spendstream.keys import create_key

    client = get_client(settings)
    try:
        _, read_key = create_key(client, settings.bootstrap_tenant, ["read"], "reader")
    finally:
        client.close()
    auth = {"Authorization": f"Bearer {read_key}", **JSON}

    async def known_to_both() -> bool:
        # a new key is picked up by the next reload: an unknown key reloads early at most every
        # 0.5 s, and the tests before this one may just have spent that on unknown keys
        gateway = await clients["gateway"].post("/v1/events", content=MALFORMED, headers=auth)
        query_api = await clients["query_api"].get("/v1/projects", headers=auth)
        return gateway.status_code != 401 and query_api.status_code != 401

    await wait_until(known_to_both, timeout=10)
    events = await clients["gateway"].post("/v1/events", content=MALFORMED, headers=auth)
    assert events.status_code == 403 and "'ingest'" in events.json()["message"]
    projects = await clients["query_api"].post("/v1/projects", json={"id": "p1"}, headers=auth)
    assert projects.status_code == 403 and projects.json()["error"] == "forbidden"
    check = await clients["gateway"].post("/v1/budgets/check", json={}, headers={"X-API-Key": read_key})
    assert check.status_code == 200 and check.json()["allowed"] is True  # read suffices, by X-API-Key too
