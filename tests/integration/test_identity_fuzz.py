"""Schemathesis against the query API's own OpenAPI document, for the people and organisation
routes (``/auth/*``, ``/v1/orgs/*``), served live on the embedded ClickHouse: positive and
negative bodies, paths and headers never get a 5xx, and every refusal is a JSON body naming what
was wrong. Bounded: a few hundred requests."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from identity_support import IDENTITY, bearer, login, register
from query_api_stack import QueryApiServer, migrate
from schemathesis import GenerationMode

pytestmark = [
    pytest.mark.clickhouse,
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]


@pytest.fixture(scope="module")
def live(make_settings):
    settings = make_settings(identity=IDENTITY)
    migrate(settings)
    with QueryApiServer(settings) as server, httpx.Client(base_url=server.url, timeout=60.0) as api:
        org = register(api, "fuzz-owner@example.com")["org"]["id"]
        yield server.url, org, login(api, "fuzz-owner@example.com")["access_token"]


def test_no_server_errors_and_refusals_name_the_problem(live):
    url, org, token = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[int, int] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [o for o in operations if o.path.startswith(("/auth/", "/v1/orgs/"))]
    assert len(operations) >= 12
    operations.sort(key=lambda o: o.path == "/auth/logout")  # logging out ends the token the others use
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        for mode in modes:

            @settings(
                max_examples=15,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                if "org_id" in (case.path_parameters or {}) and len(seen) % 2 == 0:
                    case.path_parameters["org_id"] = org  # half the calls reach the caller's own organisation
                response = case.call(base_url=url, headers=bearer(token))
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
                )
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) >= {"error", "field", "message"} and body["message"], body
                    if response.status_code in (400, 422):  # bad input: the field (or header, or body) is named
                        assert body["field"], (case.method, case.path, body)

            run()
    assert {200, 401, 422} <= set(seen), seen
