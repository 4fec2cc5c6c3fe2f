"""Every route of the query API under ``/v1/`` takes a person's access token with the scopes of
their role, by the same rule as an API key: over the whole route table (not a sample), a token's
answer equals the answer of an API key of the same organisation holding that role's scopes, a
viewer gets 403 on every admin route (and on the key routes, which a member may use for their own
keys) and never on a read route, and an owner on none.

Then the login limits: failed logins per account and attempts per IP end in 429 with Retry-After.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi.routing import APIRoute
from identity_support import IDENTITY, PASSWORD, bearer, invite_and_accept, login, register
from query_api_stack import QueryApiServer, migrate

from query_api.app import ROUTERS
from spendstream.clickhouse import get_client
from spendstream.identity.roles import ROLE_SCOPES
from spendstream.keys import create_key

pytestmark = pytest.mark.clickhouse


def _required_scopes(route: APIRoute) -> set[str]:
    found: set[str] = set()

    def walk(dependant) -> None:
        name = getattr(dependant.call, "__name__", "") or ""
        if name.startswith("require_"):
            found.update(name.removeprefix("require_").split("_or_"))
        for sub in dependant.dependencies:
            walk(sub)

    walk(route.dependant)
    return found


#: (method, path template, required scopes) of every /v1/ route of every router the app includes
ROUTES = sorted(
    (method, route.path, frozenset(_required_scopes(route)))
    for module in ROUTERS
    for route in module.router.routes
    if isinstance(route, APIRoute) and route.path.startswith("/v1/")
    for method in route.methods
)
IDS = [f"{method} {path}" for method, path, _ in ROUTES]


def test_the_route_table_is_complete_and_every_v1_route_names_its_scope():
    assert len(ROUTES) >= 30
    assert {"admin", "read", "keys"} == set().union(*(s for _, _, s in ROUTES))
    assert all(scopes for _, _, scopes in ROUTES), [r for r in ROUTES if not r[2]]
    assert {(m, p) for m, p, s in ROUTES if s == {"admin", "keys"}} == {
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("DELETE", "/v1/keys/{key_id}"),
    }
    paths = {path for _, path, _ in ROUTES}
    assert {"/v1/orgs/{org_id}/members/{user_id}", "/v1/orgs/{org_id}/invites", "/v1/keys"} <= paths


@pytest.fixture(scope="module")
def server(make_settings):
    settings = make_settings(identity=IDENTITY)
    migrate(settings)
    with QueryApiServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def people(server):
    """An organisation with an owner, an admin, a member and a viewer, and an API key per role."""
    with httpx.Client(base_url=server.url, timeout=60.0) as api:
        org = register(api, "owner@example.com", "Owner")["org"]["id"]
        tokens = {"owner": login(api, "owner@example.com")["access_token"]}
        for role in ("admin", "member", "viewer"):
            invite_and_accept(api, tokens["owner"], org, f"{role}@example.com", role)
            tokens[role] = login(api, f"{role}@example.com")["access_token"]
    client = get_client(server.settings)
    try:
        keys = {role: create_key(client, org, sorted(scopes), role)[1] for role, scopes in ROLE_SCOPES.items()}
    finally:
        client.close()
    return org, tokens, keys


def _call_url(path: str, org: str) -> str:
    url = (
        path.replace("{org_id}", org)
        .replace("{provider}", "openai")
        .replace("{model:path}", "gpt-4o")
        .replace("{user_id}", "usr-nobody")
    )
    for name in (
        "budget_id",
        "webhook_id",
        "override_id",
        "project_id",
        "key_id",
        "invite_id",
        "rule_id",
        "connection_id",
        "job_id",
    ):
        url = url.replace("{" + name + "}", "nothing-here")
    assert "{" not in url, url
    return url


def _call(api: httpx.Client, method: str, path: str, org: str, credential: str) -> httpx.Response:
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return api.request(method, _call_url(path, org), json=body, headers=bearer(credential))


@pytest.mark.parametrize("role", ["owner", "admin", "member", "viewer"])
@pytest.mark.parametrize(("method", "path", "scopes"), ROUTES, ids=IDS)
def test_a_user_token_gets_what_an_api_key_with_the_roles_scopes_gets(server, people, role, method, path, scopes):
    org, tokens, keys = people
    with httpx.Client(base_url=server.url, timeout=60.0) as api:
        by_token = _call(api, method, path, org, tokens[role])
        by_key = _call(api, method, path, org, keys[role])
    assert by_token.status_code < 500, by_token.text
    allowed = bool(scopes & ROLE_SCOPES[role])
    if allowed:
        assert by_token.status_code not in (401, 403), by_token.text
    else:
        assert by_token.status_code == 403, by_token.text
        assert by_token.json()["error"] == "forbidden"
    assert by_token.status_code == by_key.status_code, (by_token.text, by_key.text)


def test_viewers_get_403_on_every_admin_route(server, people):
    org, tokens, _ = people
    admin_routes = [(m, p) for m, p, s in ROUTES if s == {"admin"}] + [(m, p) for m, p, s in ROUTES if "keys" in s]
    assert len(admin_routes) >= 15
    with httpx.Client(base_url=server.url, timeout=60.0) as api:
        statuses = {f"{m} {p}": _call(api, m, p, org, tokens["viewer"]).status_code for m, p in admin_routes}
    assert set(statuses.values()) == {403}, statuses


# ---------------------------------------------------------------- brute force


@pytest.fixture(scope="module")
def strict(make_settings):
    settings = make_settings(
        identity={**IDENTITY, "login_failures_per_account": 3, "login_attempts_per_ip": 12, "login_window_s": 60}
    )
    migrate(settings)
    with QueryApiServer(settings) as server, httpx.Client(base_url=server.url, timeout=60.0) as api:
        yield api


def test_failed_logins_per_account_end_in_429_with_retry_after(strict):
    register(strict, "target@example.com")
    register(strict, "bystander@example.com")  # 2 attempts of the IP's 12 so far
    for _ in range(3):
        wrong = strict.post("/auth/login", json={"email": "target@example.com", "password": "guess guess guess"})
        assert wrong.status_code == 401
    for password in ("guess guess guess", PASSWORD):  # even the right password waits now
        locked = strict.post("/auth/login", json={"email": "target@example.com", "password": password})
        assert locked.status_code == 429, locked.text
        assert locked.json()["field"] == "email"
        assert 1 <= int(locked.headers["retry-after"]) <= 60
    # other accounts are not locked by it
    assert login(strict, "bystander@example.com")["token_type"] == "bearer"


def test_attempts_per_ip_end_in_429_whatever_the_account(strict):
    statuses = [
        strict.post("/auth/login", json={"email": f"spray{i}@example.com", "password": "guess guess"}).status_code
        for i in range(15)
    ]
    assert 429 in statuses and set(statuses) <= {401, 429}
    assert statuses[-1] == 429
    throttled = strict.post("/auth/login", json={"email": "bystander@example.com", "password": PASSWORD})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    # registration from the same address is limited too
    assert strict.post("/auth/register", json={"email": "late@example.com", "password": PASSWORD,
                                               "name": "L"}).status_code == 429  # fmt: skip


@pytest.fixture(scope="module")
def other_org(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as api:
        return register(api, "stranger@example.com", "Stranger")["org"]["id"]


@pytest.mark.parametrize(("method", "path", "scopes"), ROUTES, ids=IDS)
def test_a_forged_x_org_id_is_403_on_every_route(server, people, other_org, method, path, scopes):
    """The owner of one organisation names another in X-Org-Id (and in the path, where there is
    one): every route refuses before doing anything."""
    _, tokens, _ = people
    with httpx.Client(base_url=server.url, timeout=60.0) as api:
        answer = _call(api, method, path, other_org, tokens["owner"]) if "{org_id}" in path else None
        forged = api.request(
            method,
            _call_url(path, other_org),
            json={} if method in ("POST", "PUT", "PATCH") else None,
            headers=bearer(tokens["owner"], other_org),
        )
    assert forged.status_code == 403, forged.text
    if answer is not None:
        assert answer.status_code == 403, answer.text
