"""Schemathesis against the gateway's own OpenAPI document, served live with the embedded broker.

Positive and negative cases for every operation: no 5xx but the documented 503, and every answer
conforms to the document (status, content type, body schema, headers). Bounded: a few hundred
requests, well under a minute.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest_gateway.app import create_app

pytestmark = [
    pytest.mark.kafka,
    # schemathesis draws from `random` inside its strategies (its own code, not this test)
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

ADMIN = "fuzz-admin-key-0123456789abcdef"
EXAMPLES = {"/v1/events": 120}  # per generation mode; the probes have little to vary
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# positive_data_acceptance is left out on purpose: the document cannot express the semantic rules
# (subsets within their parents, the 5-minute future limit, provider usage shapes), so some
# schema-valid bodies are rightly answered 400 with the field named.


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value):  # the documented body is a string of JSON lines; anything else, one line
    # stdlib json, not orjson: generated integers beyond 64 bits must reach the gateway (which rejects them)
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


@pytest.fixture(scope="module")
def live_gateway(make_settings, unique_name):
    settings = make_settings(with_clickhouse=False, bootstrap_admin_key=ADMIN, bootstrap_tenant=unique_name("fuzz"))
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.gateway.port, log_level="warning",
                            lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fuzz-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.gateway.port}"
    server.should_exit = True
    thread.join(30)


def test_no_undocumented_server_errors(live_gateway):
    schema = schemathesis.openapi.from_url(f"{live_gateway}/openapi.json")
    seen: dict[int, int] = {}
    with httpx.Client() as probe:
        assert probe.get(f"{live_gateway}/healthz").status_code == 200
    for result in schema.get_all_operations():
        operation = result.ok()
        # operations without a body or parameters have no negative data to generate
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        for mode in modes:

            @settings(
                max_examples=EXAMPLES.get(operation.path, 10),
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=live_gateway, headers={"Authorization": f"Bearer {ADMIN}"})
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500 or response.status_code == 503, (
                    f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
                )
                case.validate_response(response, checks=CHECKS)

            run()
    assert seen.get(202, 0) > 0 and seen.get(400, 0) > 0, seen  # both paths of /v1/events were exercised
