"""The real gateway app in-process, without a broker: every request-level rejection and every
all-invalid body is answered before Kafka is involved (publishing is tested in integration/)."""

from __future__ import annotations

import gzip

import httpx
import orjson
import pytest

from ingest_gateway.app import create_app
from spendstream.settings import Settings

ADMIN = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
JSON = {**AUTH, "Content-Type": "application/json"}
EVENT = {"project": "bot", "provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 2}
CLOSED = "127.0.0.1:1"  # nothing listens: no broker, no ClickHouse


@pytest.fixture(scope="module")
async def client():
    settings = Settings(
        bootstrap_admin_key=ADMIN,
        bootstrap_tenant="acme",
        kafka={"bootstrap_servers": CLOSED, "profile": "embedded"},
        clickhouse={"url": f"http://{CLOSED}"},
        gateway={"max_events_per_request": 5, "max_body_bytes": 4096},
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as c:
            yield c


async def post(client, body: bytes, headers: dict | None = None) -> httpx.Response:
    return await client.post("/v1/events", content=body, headers=JSON if headers is None else headers)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({**EVENT, "input_tokens": -1}, "input_tokens"),
        ({**EVENT, "cache_read_tokens": 11}, "cache_read_tokens"),
        ({**EVENT, "reasoning_tokens": 3}, "reasoning_tokens"),
        ({**EVENT, "timestamp": "2999-01-01T00:00:00Z"}, "timestamp"),
        ({**EVENT, "colour": "red"}, "colour"),
        ({k: v for k, v in EVENT.items() if k != "project"}, "project"),
        ({**EVENT, "provider": None, "model": "gpt-4o"}, "provider"),
        ({**EVENT, "status": "maybe"}, "status"),
        ({**EVENT, "cost_usd": "lots"}, "cost_usd"),
        ({**EVENT, "tags": {"team": 7}}, "tags"),
        ({"project": "p", "model": "openai/gpt-4o", "usage": {"prompt_tokens": -4}}, "usage.prompt_tokens"),
    ],
)
async def test_all_invalid_is_400_naming_the_field(client, event, field):
    answer = await post(client, orjson.dumps([{k: v for k, v in event.items() if v is not None}]))
    assert answer.status_code == 400
    body = answer.json()
    assert body["accepted"] == 0 and body["event_ids"] == []
    assert body["rejected"][0]["index"] == 0
    assert body["rejected"][0]["errors"][0]["field"] == field


async def test_rejections_carry_the_client_event_id(client):
    answer = await post(client, orjson.dumps([{**EVENT, "event_id": "mine-1", "input_tokens": -1}, {"event_id": 5}]))
    assert answer.status_code == 400
    assert [(r["index"], r["event_id"]) for r in answer.json()["rejected"]] == [(0, "mine-1"), (1, None)]


@pytest.mark.parametrize(
    ("headers", "status", "header"),
    [
        ({}, 401, "www-authenticate"),
        ({"Authorization": "Bearer wrong-key"}, 401, "www-authenticate"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "www-authenticate"),
        ({"Authorization": "Bearer ss_0123456789abcdef_notarealsecretnotarealsecret"}, 401, "www-authenticate"),
    ],
)
async def test_missing_or_wrong_keys_are_401(client, headers, status, header):
    answer = await post(client, orjson.dumps(EVENT), {**headers, "Content-Type": "application/json"})
    assert answer.status_code == status
    assert answer.json()["error"] == "unauthenticated"
    assert answer.headers[header] == "Bearer"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(client, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    answer = await post(client, orjson.dumps(EVENT), headers)
    assert answer.status_code == 415
    assert "application/x-ndjson" in answer.json()["message"]


async def test_unsupported_content_encoding_is_415(client):
    answer = await post(client, orjson.dumps(EVENT), {**JSON, "Content-Encoding": "br"})
    assert answer.status_code == 415


async def test_limits_are_413(client):
    too_many = await post(client, orjson.dumps([EVENT] * 6))
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_events"
    too_big = await post(client, orjson.dumps([{**EVENT, "user": "u" * 250}] * 5 + [{"pad": "x" * 3000}]))
    assert too_big.status_code == 413 and too_big.json()["error"] == "body_too_large"
    bomb = gzip.compress(b"[" + b" " * 100_000 + b"]")
    inflated = await post(client, bomb, {**JSON, "Content-Encoding": "gzip"})
    assert inflated.status_code == 413 and "decompressed" in inflated.json()["message"]


async def test_malformed_json_is_400_with_position(client):
    answer = await post(client, b'[\n{"project": "p",\n "model": }\n]')
    assert answer.status_code == 400
    assert answer.json()["error"] == "malformed_json"
    assert "line 3, column 11" in answer.json()["message"]


async def test_malformed_ndjson_names_the_line(client):
    body = orjson.dumps(EVENT) + b"\n{oops\n"
    answer = await post(client, body, {**AUTH, "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 400 and "line 2" in answer.json()["message"]


async def test_gzip_ndjson_body_reaches_validation(client):
    body = gzip.compress(b"\n".join(orjson.dumps({**EVENT, "output_tokens": -1}) for _ in range(3)))
    answer = await post(client, body, {**AUTH, "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
    assert answer.status_code == 400
    assert [r["index"] for r in answer.json()["rejected"]] == [0, 1, 2]


async def test_valid_events_without_a_broker_are_503_and_not_accepted(client):
    answer = await post(client, orjson.dumps([EVENT, {**EVENT, "input_tokens": -1}]))
    assert answer.status_code == 503
    assert answer.headers["retry-after"].isdigit()
    assert "accepted" not in answer.json()


async def test_other_methods_are_405(client):
    answer = await client.get("/v1/events", headers=AUTH)
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"


async def test_probes_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["broker"] is False
    metrics = (await client.get("/metrics")).text
    assert 'spendstream_gateway_events_rejected_total{reason="input_tokens"}' in metrics
    assert 'spendstream_gateway_requests_total{status="415"}' in metrics
    assert "spendstream_gateway_request_seconds_bucket" in metrics
    assert "spendstream_gateway_in_flight_events 0.0" in metrics


async def test_openapi_documents_every_body_form(client):
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/events"]["post"]
    content = op["requestBody"]["content"]
    assert set(content["application/json"]["examples"]) >= {"single", "batch", "anthropic_usage", "gemini_usage"}
    assert "ndjson" in content["application/x-ndjson"]["examples"]
    assert {"202", "400", "401", "403", "413", "415", "429", "503"} <= set(op["responses"])
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert "IngestResult" in spec["components"]["schemas"]
    assert (await client.get("/docs")).status_code == 200
