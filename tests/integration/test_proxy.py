"""The AI API proxy end to end: SDK-shaped calls -> the real gateway -> a fake upstream serving the
providers' recorded wire shapes (tests/fixtures/proxy/) -> one usage event per call on usage.raw
(the real embedded broker), priced as genai-prices prices the provider's usage, to the nano-USD.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal

import orjson
import pytest
from gateway_support import events_by_id, gateway, raw_position, read_raw  # tests/integration is on sys.path
from genai_prices import extract_usage
from proxy_support import FIXTURES, FakeUpstream, anthropic_headers, fixture_events, fixture_json, openai_headers
from query_api_stack import QueryApiServer, migrate

from ingest_gateway.proxy.service import UpstreamCut
from ingest_gateway.proxy.usage import sse_fields
from spendstream.clickhouse import get_client
from spendstream.contracts import raw_envelope
from spendstream.keys import create_key
from spendstream.pricing import default_catalog
from spendstream.provider_keys import create_provider_key
from spendstream.secrets import Keyring, generate_key
from spendstream.topics import BUDGET_STATE, USAGE_RAW, ensure_topics
from stream_processors.pricing.logic import PricingStage, RawRecord

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]

OPENAI_KEY = "sk-proj-stored-openai-key-0123456789"
ANTHROPIC_KEY = "sk-ant-api03-stored-anthropic-key-0123456789"
SECRET_KEYS = f"{generate_key('k2')},{generate_key('k1')}"


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
async def settings(make_settings, upstream):
    s = make_settings(
        secret_keys=SECRET_KEYS,
        bootstrap_admin_key="ss_bootstrapadmin_" + "x" * 30,
        proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url},
        budgets={"reload_s": 0.2},
        gateway={"key_cache_refresh_s": 0.2},
    )
    migrate(s)
    await ensure_topics(s, (USAGE_RAW, BUDGET_STATE))
    return s


@pytest.fixture
def tenant(settings, unique_name):
    """A fresh tenant with an ingest key and a stored key for each provider."""
    name = unique_name("t")
    client = get_client(settings)
    try:
        _, key = create_key(client, name, "ingest", "agents")
        keyring = Keyring.parse(SECRET_KEYS)
        create_provider_key(client, keyring, name, "openai", "main", OPENAI_KEY, project="proj-default")
        create_provider_key(client, keyring, name, "anthropic", "main", ANTHROPIC_KEY, project="proj-default")
    finally:
        client.close()
    return name, key


def nanos(amount: Decimal) -> int:
    return int((amount * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def expected_nanos(response: dict, provider: str, flavour: str = "default") -> int:
    return nanos(extract_usage(response, provider_id=provider, api_flavor=flavour).calc_price().total_price)


def stored_cost(event: dict) -> int:
    """What the pricing stage writes for the event (its batch function on a raw record holding
    it; the sink stores ``cost_nanos`` as written)."""
    raw = raw_envelope("t", event["project"], event["timestamp"], [event])
    stage = PricingStage(default_catalog(), USAGE_RAW.name, 3_600_000)
    result = stage.process([RawRecord(0, 0, b"t/" + event["project"].encode(), orjson.dumps(raw))], now_ms=0)
    assert not result.dlq, result.dlq
    (priced,) = orjson.loads(result.priced[0].value)["events"]
    assert priced["pricing_status"] == "priced", priced
    return priced["cost_nanos"]


def data_of(body: bytes) -> list[bytes]:
    return [sse_fields(part + b"\n\n")[1] for part in body.split(b"\n\n") if part.strip()]


async def events_for(settings, tenant: str, since, ids: list[str]) -> dict[str, dict]:
    found = events_by_id(await read_raw(settings, tenant, len(ids), since))
    assert set(ids) <= set(found), (ids, list(found))
    return found


async def test_openai_chat_non_streaming_passes_through_and_is_priced(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "user": "body-user"}
    async with gateway(settings) as gw:
        r = await gw.post(
            "/proxy/openai/v1/chat/completions",
            content=json.dumps(body),
            headers=openai_headers(
                key, **{"X-Spendstream-Agent": "planner", "X-Spendstream-Tags": "team=search,env=ci"}
            ),
        )
        assert r.status_code == 200
        assert r.content == (FIXTURES / "openai_chat.json").read_bytes()  # byte for byte
        assert r.headers["openai-processing-ms"] == "321" and r.headers["x-request-id"] == "req_up_chat"
        rid = r.headers["x-spendstream-request-id"]
        seen = upstream.requests[-1]
        # the stored provider key went upstream, never the Spendstream key
        assert seen["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
        assert key not in json.dumps(seen["headers"]) and "x-spendstream-tags" not in seen["headers"]
        assert seen["body"] == body and seen["headers"]["x-stainless-retry-count"] == "0"
        events = await events_for(settings, name, since, [rid])
    ev = events[rid]
    assert ev["provider"] == "openai" and ev["model"] == "gpt-4o-2024-08-06" and ev["status"] == "ok"
    assert (ev["project"], ev["agent"], ev["user"]) == ("proj-default", "planner", "body-user")
    assert ev["tags"] == {"team": "search", "env": "ci"} and ev["operation"] == "chat"
    assert (ev["input_tokens"], ev["output_tokens"], ev["cache_read_tokens"]) == (2006, 10, 1920)
    assert isinstance(ev["latency_ms"], int)
    assert stored_cost(ev) == expected_nanos(fixture_json("openai_chat.json"), "openai", "chat")


async def test_openai_reasoning_tokens_are_metered(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        r = await gw.post(
            "/proxy/openai/v1/chat/completions",
            json={"model": "o4-mini", "messages": [{"role": "user", "content": "6*7?"}], "max_completion_tokens": 4000},
            headers=openai_headers(key),
        )
        assert r.status_code == 200
        ev = (await events_for(settings, name, since, [rid := r.headers["x-spendstream-request-id"]]))[rid]
    assert (ev["output_tokens"], ev["reasoning_tokens"]) == (1650, 1600)
    assert stored_cost(ev) == expected_nanos(fixture_json("openai_chat_reasoning.json"), "openai", "chat")


@pytest.mark.parametrize("client_asks_usage", [False, True])
async def test_openai_chat_stream_usage_chunk(settings, upstream, tenant, client_asks_usage):
    """Without include_usage the proxy asks upstream for it and the client never sees the extra
    chunk (every chunk it gets has a choices[0]); with it, the client gets the chunk as sent."""
    name, key = tenant
    since = await raw_position(settings)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}
    async with gateway(settings) as gw:
        async with gw.stream("POST", "/proxy/openai/v1/chat/completions", json=body, headers=openai_headers(key)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join([c async for c in r.aiter_raw()])
            rid = r.headers["x-spendstream-request-id"]
        assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
        ev = (await events_for(settings, name, since, [rid]))[rid]
    full = b"".join(fixture_events("openai_chat_stream.sse"))
    datas = data_of(raw)
    assert datas[-1] == b"[DONE]"
    chunks = [orjson.loads(d) for d in datas[:-1]]
    if client_asks_usage:
        assert raw == full  # byte for byte
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2006
    else:
        assert all(c["choices"] and c["choices"][0]["index"] == 0 for c in chunks)  # choices[0] never breaks
        assert len(chunks) == 4
    assert ev["status"] == "ok" and (ev["input_tokens"], ev["output_tokens"], ev["cache_read_tokens"]) == (
        2006,
        10,
        1920,
    )
    assert stored_cost(ev) == expected_nanos(fixture_json("openai_chat.json"), "openai", "chat")


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_responses(settings, upstream, tenant, stream):
    name, key = tenant
    since = await raw_position(settings)
    body = {"model": "gpt-5", "input": "Hi", "max_output_tokens": 1000, "stream": stream}
    async with gateway(settings) as gw:
        r = await gw.post("/proxy/openai/v1/responses", json=body, headers=openai_headers(key))
        assert r.status_code == 200
        if stream:
            assert r.content == b"".join(fixture_events("openai_responses_stream.sse"))
            assert upstream.requests[-1]["body"] == body  # Responses streams are not rewritten
        rid = r.headers["x-spendstream-request-id"]
        ev = (await events_for(settings, name, since, [rid]))[rid]
    assert ev["model"] == "gpt-5-2025-08-07" and ev["operation"] == "responses" and ev["status"] == "ok"
    assert (ev["input_tokens"], ev["cache_read_tokens"], ev["output_tokens"], ev["reasoning_tokens"]) == (
        1200,
        1024,
        300,
        256,
    )
    assert stored_cost(ev) == expected_nanos(fixture_json("openai_responses.json"), "openai", "responses")


async def test_openai_embeddings_and_unmetered_routes(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        r = await gw.post(
            "/proxy/openai/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": "hi"},
            headers=openai_headers(key),
        )
        assert r.status_code == 200
        models = await gw.get("/proxy/openai/v1/models", headers=openai_headers(key))
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "gpt-4o"
        rids = [r.headers["x-spendstream-request-id"], models.headers["x-spendstream-request-id"]]
        events = await events_for(settings, name, since, rids)
    ev = events[rids[0]]
    assert (ev["model"], ev["input_tokens"], ev["output_tokens"], ev["operation"]) == (
        "text-embedding-3-small",
        8,
        0,
        "embeddings",
    )
    assert stored_cost(ev) == expected_nanos(fixture_json("openai_embeddings.json"), "openai", "embeddings")
    listed = events[rids[1]]  # passed through, recorded without usage
    assert (listed["input_tokens"], listed["output_tokens"], listed["operation"]) == (0, 0, "models")


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_messages_with_5m_and_1h_cache_writes(settings, upstream, tenant, stream):
    name, key = tenant
    since = await raw_position(settings)
    body = {
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
        "messages": [{"role": "user", "content": "Hello"}], "metadata": {"user_id": "u-42"},
    }  # fmt: skip
    async with gateway(settings) as gw:
        r = await gw.post("/proxy/anthropic/v1/messages", json=body, headers=anthropic_headers(key))
        assert r.status_code == 200
        expected_body = (
            b"".join(fixture_events("anthropic_message_stream.sse"))
            if stream
            else json.dumps(fixture_json("anthropic_message.json"), separators=(",", ":")).encode()
        )
        assert r.content == expected_body
        seen = upstream.requests[-1]
        assert seen["path"] == "/v1/messages" and seen["headers"]["x-api-key"] == ANTHROPIC_KEY
        assert seen["headers"]["anthropic-version"] == "2023-06-01" and seen["body"] == body
        rid = r.headers["x-spendstream-request-id"]
        ev = (await events_for(settings, name, since, [rid]))[rid]
    # total input = uncached 50 + cache writes 3000 + cache reads 10000; cumulative deltas never summed
    assert (ev["input_tokens"], ev["cache_read_tokens"], ev["cache_write_tokens"], ev["cache_write_1h_tokens"]) == (
        13050, 10000, 3000, 2000,
    )  # fmt: skip
    assert ev["output_tokens"] == 120 and ev["user"] == "u-42" and ev["status"] == "ok"
    assert stored_cost(ev) == expected_nanos(fixture_json("anthropic_message.json"), "anthropic")


async def test_anthropic_bearer_auth_and_count_tokens(settings, upstream, tenant):
    name, key = tenant
    async with gateway(settings) as gw:
        headers = anthropic_headers("", Authorization=f"Bearer {key}")
        del headers["x-api-key"]
        r = await gw.post("/proxy/anthropic/v1/messages/count_tokens",
                          json={"model": "claude-sonnet-4-5", "messages": []}, headers=headers)  # fmt: skip
        assert r.status_code == 200 and r.json() == {"input_tokens": 14}
        seen = upstream.requests[-1]
        assert seen["headers"]["x-api-key"] == ANTHROPIC_KEY and "authorization" not in seen["headers"]


async def test_passthrough_mode_forwards_the_callers_own_key(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        r = await gw.post(
            "/proxy/openai/v1/chat/completions",
            json={"model": "gpt-4o", "messages": []},
            headers=openai_headers("sk-callers-own", **{"X-Spendstream-Key": key, "X-Spendstream-Project": "p1"}),
        )
        assert r.status_code == 200
        seen = upstream.requests[-1]
        assert seen["headers"]["authorization"] == "Bearer sk-callers-own"
        assert "x-spendstream-key" not in seen["headers"]
        rid = r.headers["x-spendstream-request-id"]
        ev = (await events_for(settings, name, since, [rid]))[rid]
        # a Spendstream key in the provider's own header too is never sent upstream
        h = anthropic_headers(key, **{"X-Spendstream-Key": key, "Authorization": "Bearer sk-ant-own-oauth"})
        r = await gw.post("/proxy/anthropic/v1/messages/count_tokens", json={"model": "m", "messages": []}, headers=h)
        assert r.status_code == 200
        seen = upstream.requests[-1]["headers"]
        assert "x-api-key" not in seen and seen["authorization"] == "Bearer sk-ant-own-oauth"
        assert key not in json.dumps(seen)
    assert ev["project"] == "p1"


async def test_refusals_are_provider_shaped_and_never_forwarded(settings, upstream, tenant):
    name, key = tenant
    before = len(upstream.requests)
    async with gateway(settings) as gw:
        bad = await gw.post("/proxy/openai/v1/chat/completions", json={}, headers=openai_headers("sk-not-ours"))
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "invalid_api_key"
        bad = await gw.post("/proxy/anthropic/v1/messages", json={}, headers=anthropic_headers("nope"))
        assert bad.status_code == 401 and bad.json()["type"] == "error"
        assert bad.json()["error"]["type"] == "authentication_error"
        tags = await gw.post("/proxy/openai/v1/chat/completions", json={"model": "gpt-4o"},
                             headers=openai_headers(key, **{"X-Spendstream-Tags": "novalue"}))  # fmt: skip
        assert tags.status_code == 400 and tags.json()["error"]["param"] == "x-spendstream-tags"
    assert len(upstream.requests) == before


async def test_upstream_errors_pass_through_and_are_recorded(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        r = await gw.post("/proxy/openai/v1/chat/completions", json={"model": "rate-limited", "messages": []},
                          headers=openai_headers(key))  # fmt: skip
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        a = await gw.post("/proxy/anthropic/v1/messages", json={"model": "rate-limited", "max_tokens": 5, "messages": []},
                          headers=anthropic_headers(key))  # fmt: skip
        assert a.status_code == 429 and a.json()["error"]["type"] == "rate_limit_error"
        rids = [r.headers["x-spendstream-request-id"], a.headers["x-spendstream-request-id"]]
        events = await events_for(settings, name, since, rids)
    assert [events[i]["status"] for i in rids] == ["error", "error"]
    assert events[rids[0]]["model"] == "rate-limited" and events[rids[0]]["input_tokens"] == 0


async def test_stream_cut_short_is_recorded_as_error_with_usage_so_far(settings, upstream, tenant):
    name, key = tenant
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        # the client's response is cut too (through ASGI the app's error reaches the client)
        with pytest.raises(UpstreamCut):
            await gw.post(
                "/proxy/anthropic/v1/messages",
                json={"model": "cut-stream", "max_tokens": 100, "stream": True, "messages": []},
                headers=anthropic_headers(key),
            )
        found = events_by_id(await read_raw(settings, name, 1, since))
        (rid,) = found  # the tenant is new: its only event
        ev = (await events_for(settings, name, since, [rid]))[rid]
    assert ev["status"] == "error"
    # message_start arrived: its usage is what the call used so far
    assert (ev["input_tokens"], ev["output_tokens"], ev["cache_write_1h_tokens"]) == (13050, 1, 2000)


async def test_provider_keys_crud_on_the_query_api(settings, unique_name):
    name = unique_name("t")
    client = get_client(settings)
    try:
        _, admin = create_key(client, name, "admin", "admin")
        with QueryApiServer(settings) as server, server.client(admin) as api:
            secret = "sk-proj-never-shown-again-9876543210"
            created = api.post("/v1/provider-keys", json={"provider": "openai", "name": "prod", "api_key": secret})
            assert created.status_code == 201, created.text
            assert secret not in created.text and set(created.json()) == {
                "id",
                "provider",
                "name",
                "project",
                "created_at",
            }
            listed = api.get("/v1/provider-keys")
            assert [k["id"] for k in listed.json()["provider_keys"]] == [created.json()["id"]]
            assert secret not in listed.text
            bad = api.post("/v1/provider-keys", json={"provider": "gemini", "name": "x", "api_key": "k"})
            assert bad.status_code == 422 and bad.json()["field"] == "provider"
            bad = api.post("/v1/provider-keys", json={"provider": "openai", "name": "x", "api_key": "a\nb"})
            assert bad.status_code == 422 and bad.json()["field"] == "api_key"
            # stored sealed: the row holds no trace of the key
            row = client.query(
                "SELECT * FROM provider_keys WHERE tenant = {t:String}", parameters={"t": name}
            ).named_results()
            assert secret not in str(list(row))
            assert api.delete(f"/v1/provider-keys/{created.json()['id']}").status_code == 204
            assert api.get("/v1/provider-keys").json()["provider_keys"] == []
            assert api.delete(f"/v1/provider-keys/{created.json()['id']}").status_code == 404
    finally:
        client.close()


async def test_one_tenant_cannot_hold_every_upstream_connection(make_settings, upstream, unique_name):
    settings = make_settings(
        proxy={"openai_base_url": upstream.url + "/v1", "max_calls_per_tenant": 2},
    )
    migrate(settings)
    name = unique_name("t")
    client = get_client(settings)
    try:
        _, key = create_key(client, name, "ingest", "agents")
    finally:
        client.close()
    headers = openai_headers("sk-own", **{"X-Spendstream-Key": key})
    async with gateway(settings) as gw:
        proxy = gw.app.state.proxy  # type: ignore[attr-defined]
        proxy._tenant_calls[name] = 2  # two calls of the tenant in flight
        r = await gw.post(
            "/proxy/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=headers
        )
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "1"
        proxy._tenant_calls[name] = 1
        async with gw.stream("POST", "/proxy/openai/v1/chat/completions", headers=headers,
                             json={"model": "gpt-4o", "messages": [], "stream": True}) as s:  # fmt: skip
            assert s.status_code == 200
            async for _ in s.aiter_raw():
                pass
        assert proxy._tenant_calls == {name: 1}  # the stream's slot was given back when it ended


def test_rotation_reseals_stored_keys_with_the_new_primary(settings, unique_name):
    from spendstream.provider_keys import load_open_keys, reseal_all
    from spendstream.secrets import key_id_of

    name = unique_name("t")
    old_entry, new_entry = generate_key("old"), generate_key("new")
    client = get_client(settings)
    try:
        create_provider_key(client, Keyring.parse(old_entry), name, "anthropic", "rotating", "sk-ant-rotate-me")
        rotated = Keyring.parse(f"{new_entry},{old_entry}")
        # (other tests' keys in this database are sealed with keys this ring lacks: counted, left alone)
        resealed, _ = reseal_all(client, rotated)
        assert resealed == 1
        assert reseal_all(client, rotated)[0] == 0  # nothing left under the old key
        mine = lambda keys: [k for k in keys if k.tenant == name]  # noqa: E731
        opened, failed = load_open_keys(client, Keyring.parse(new_entry))  # the old key dropped
        (key,) = mine(opened)
        assert key.api_key == "sk-ant-rotate-me" and "sk-ant-rotate-me" not in repr(key)
        (row,) = client.query(
            "SELECT ciphertext FROM provider_keys FINAL WHERE tenant = {t:String}", parameters={"t": name}
        ).result_rows
        assert key_id_of(bytes.fromhex(row[0])) == "new"
    finally:
        client.close()


async def test_large_bodies_are_metered_from_their_first_and_last_bytes(make_settings, upstream, unique_name):
    """An embeddings answer far above proxy.max_usage_body_bytes passes whole and is still metered."""
    settings = make_settings(proxy={"openai_base_url": upstream.url + "/v1", "max_usage_body_bytes": 4096})
    migrate(settings)
    name = unique_name("t")
    client = get_client(settings)
    try:
        _, key = create_key(client, name, "ingest", "agents")
    finally:
        client.close()
    since = await raw_position(settings)
    async with gateway(settings) as gw:
        r = await gw.post(
            "/proxy/openai/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": ["hi"] * 500},
            headers=openai_headers("sk-own", **{"X-Spendstream-Key": key}),
        )
        assert r.status_code == 200 and len(r.content) > 500_000 and len(r.json()["data"]) == 500
        rid = r.headers["x-spendstream-request-id"]
        ev = (await events_for(settings, name, since, [rid]))[rid]
    assert (ev["model"], ev["input_tokens"], ev["status"]) == ("text-embedding-3-small", 1500, "ok")
