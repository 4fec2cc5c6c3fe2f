"""``POST /otlp/v1/traces`` on the real gateway, with the embedded broker, the pricing and sink
stages as child processes and ClickHouse: OTLP exports built with the opentelemetry-proto classes
(protobuf, gzip, OTLP JSON) end up in usage_events priced exactly as genai-prices' ``calc_price``
prices each span's usage, once per span (agent spans and retried exports add nothing), with the
project from the span, the tenant's mapping rules (changed without a restart) or the default.
Also the answers OTLP exporters act on (partial success, 400/401/413/415, Retry-After)."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import secrets
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from gateway_support import gateway
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otel_support import (
    BASE_NS,
    export,
    legacy_openllmetry_chat,
    merge,
    new_span_id,
    new_trace_id,
    semconv_chat,
    span,
    to_otlp_json,
)
from stage_support import FAST_BATCHING, StageWorker, migrate

from spendstream.clickhouse import get_client
from spendstream.contracts import usd_to_nanos
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.otel.wire import RpcStatus
from spendstream.project_mappings import COLUMNS as MAPPING_COLUMNS
from spendstream.topics import ensure_topics, ensure_topics_sync

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PB = {"Content-Type": "application/x-protobuf"}
#: span times: one hour ago, so the pricing stage's "event time" is recent and the prices current
NOW_NS = (time.time_ns() // 1_000_000_000 - 3600) * 1_000_000_000


def _genai_usage():
    spec = importlib.util.spec_from_file_location("make_pricing_corpus", FIXTURES / "make_pricing_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.genai_usage


@pytest.fixture
def otlp_stack(make_settings, tmp_path):
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap},
        bootstrap_admin_key=key,
        bootstrap_tenant="otel-tenant",
        otel={"project_mappings_reload_s": 0.2},
        **FAST_BATCHING,
    )
    migrate(settings)
    ensure_topics_sync(settings)
    worker = StageWorker(settings, "pricing,sink", tmp_path)
    try:
        worker.wait_healthy()
        yield settings, key
    finally:
        worker.stop()
        broker.stop()


def stored(settings, n: int, timeout: float = 90.0) -> dict[str, dict]:
    client = get_client(settings)
    try:
        deadline = time.monotonic() + timeout
        while client.query("SELECT count() FROM usage_events").result_rows[0][0] < n:
            assert time.monotonic() < deadline, "usage_events never reached the expected count"
            time.sleep(0.2)
        time.sleep(1.0)  # a duplicate would arrive with (or right after) the originals
        rows = client.query("SELECT * FROM usage_events").named_results()
        return {row["event_id"]: row for row in rows}
    finally:
        client.close()


def add_rule(settings, tenant: str, rule_id: str, pattern: str, project: str, priority: int, field: str) -> None:
    client = get_client(settings)
    now = datetime.now()
    try:
        client.insert(
            "project_mappings",
            [[tenant, rule_id, pattern, project, priority, field, now, now, 0, time.time_ns() // 1000]],
            column_names=list(MAPPING_COLUMNS),
        )
    finally:
        client.close()


async def test_otlp_exports_are_priced_once_per_model_call_span(otlp_stack):
    from genai_prices import calc_price

    settings, key = otlp_stack
    trace = new_trace_id()
    agent_id = new_span_id()
    at = {"start_ns": NOW_NS}
    pb_spans = [
        # new names, cache read, project from the span
        span(
            "chat gpt-4o",
            semconv_chat(**{"gen_ai.usage.cache_read.input_tokens": 1024, "spendstream.project": "support"}),
            **at,
        ),  # fmt: skip
        # deprecated names
        span("openai.chat", legacy_openllmetry_chat(), **at),
        # reasoning tokens
        span(
            "chat o3-mini",
            semconv_chat("o3-mini", **{"gen_ai.request.model": "o3-mini", "gen_ai.usage.reasoning.output_tokens": 200}),
            **at,
        ),  # fmt: skip
        # nested agent -> chat trace: only the chat span counts
        span(
            "invoke_agent planner",
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "planner",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.usage.input_tokens": 9999,
                "gen_ai.usage.output_tokens": 999,
            },
            trace_id=trace,
            span_id=agent_id,
            **at,
        ),  # fmt: skip
        span(
            "chat gpt-4o",
            semconv_chat(
                **{"spendstream.session.label": "peakpaws-safety-review", "spendstream.session.type": "subagent"}
            ),
            trace_id=trace,
            parent=agent_id,
            **at,
        ),  # fmt: skip
        span("execute_tool search", {"gen_ai.operation.name": "execute_tool"}, trace_id=trace, parent=agent_id, **at),
        # a model call without a model: rejected, reported as partial success
        span("chat", {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 3}, **at),
    ]
    pb_export = export(pb_spans, {"service.name": "fleet", "spendstream.tag.env": "prod"})
    json_spans = [
        # Anthropic via the cache_write name; input inclusive as semconv says
        span(
            "chat claude",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-3-5-sonnet-20241022",
                "gen_ai.usage.input_tokens": 3000,
                "gen_ai.usage.output_tokens": 200,
                "gen_ai.usage.cache_read.input_tokens": 1000,
                "gen_ai.usage.cache_write.input_tokens": 500,
            },
            **at,
        ),  # fmt: skip
        # OpenLIT's Anthropic span: uncached input, normalised once
        span(
            "chat claude",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "anthropic",
                "gen_ai.request.model": "claude-3-5-sonnet-20241022",
                "gen_ai.usage.input_tokens": 40,
                "gen_ai.usage.output_tokens": 500,
                "gen_ai.usage.cache_read_input_tokens": 2000,
                "gen_ai.usage.cache_creation_input_tokens": 1000,
                "gen_ai.usage.cost": 0.5,
            },
            **at,
        ),  # fmt: skip
    ]
    json_export = merge(
        export(json_spans[:1], {"service.name": "claude-fleet"}),
        export(json_spans[1:], {"service.name": "claude-fleet", "telemetry.sdk.name": "openlit"}, scope="openlit"),
    )

    async with gateway(settings, key) as client:
        r = await client.post(
            "/otlp/v1/traces",
            content=gzip.compress(pb_export.SerializeToString()),
            headers={**PB, "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200, r.content
        assert r.headers["content-type"] == "application/x-protobuf"
        answer = ExportTraceServiceResponse.FromString(r.content)
        assert answer.partial_success.rejected_spans == 1
        assert "without gen_ai.response.model" in answer.partial_success.error_message

        r = await client.post("/otlp/v1/traces", json=to_otlp_json(json_export))
        assert r.status_code == 200, r.content
        assert r.json() == {}  # every span accepted: no partial_success

        # the exporter retries the whole protobuf export (e.g. after a timeout): stored once
        r = await client.post("/otlp/v1/traces", content=pb_export.SerializeToString(), headers=PB)
        assert r.status_code == 200

    rows = await asyncio.to_thread(stored, settings, 6)
    assert len(rows) == 6  # 4 model calls + 2 (agent, tool and the rejected span add nothing)

    genai_usage = _genai_usage()
    expected_spans = [s for s in pb_spans[:3] + pb_spans[4:5] + json_spans]
    by_span = {f"otel-{s.trace_id.hex()}-{s.span_id.hex()}": s for s in expected_spans}
    assert set(rows) == set(by_span)
    for event_id, row in rows.items():
        assert row["pricing_status"] == "priced" and row["price_source"] == "catalog", row  # no opt-in: ours
        usage = genai_usage({k: row[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                                  "cache_write_tokens", "reasoning_tokens")})  # fmt: skip
        want = calc_price(usage, row["model"], provider_id=row["provider"],
                          genai_request_timestamp=row["timestamp"])  # fmt: skip
        assert row["cost_nanos"] == usd_to_nanos(want.total_price), (event_id, row["model"])
        assert row["cost_nanos"] > 0

    def row_of(s):
        return rows[f"otel-{s.trace_id.hex()}-{s.span_id.hex()}"]

    assert row_of(pb_spans[0])["project"] == "support"
    assert row_of(pb_spans[0])["cache_read_tokens"] == 1024
    assert row_of(pb_spans[0])["tags"] == {"env": "prod"}
    assert (row_of(pb_spans[1])["input_tokens"], row_of(pb_spans[1])["project"]) == (2000, "default")
    assert row_of(pb_spans[2])["reasoning_tokens"] == 200
    nested = row_of(pb_spans[4])
    assert (nested["agent"], nested["session_label"], nested["session_type"]) == (
        "planner", "peakpaws-safety-review", "subagent"
    )  # fmt: skip
    assert nested["timestamp"].timestamp() * 1000 == (NOW_NS + 1_500_000_000) // 1_000_000
    assert nested["latency_ms"] == 1500
    claude, openlit = row_of(json_spans[0]), row_of(json_spans[1])
    assert (claude["input_tokens"], claude["cache_read_tokens"], claude["cache_write_tokens"]) == (3000, 1000, 500)
    assert (openlit["input_tokens"], openlit["agent"]) == (3040, "claude-fleet")


async def test_client_cost_only_when_opted_in_and_mapping_rules_without_restart(otlp_stack):
    settings, key = otlp_stack
    tenant = "otel-tenant"

    def labelled(label: str, agent: str = "bot", **extra) -> object:
        return span("chat", semconv_chat(**{"spendstream.session.label": label, "gen_ai.agent.name": agent,
                                            **extra}), start_ns=NOW_NS)  # fmt: skip

    async with gateway(settings, key) as client:
        app = client.app
        # seed examples of the issue: peakpaws-* -> PeakPaws, kanban-* -> Kanban Board, * -> General
        add_rule(settings, tenant, "r-peak", "peakpaws-*", "PeakPaws", 10, "session_label")
        add_rule(settings, tenant, "r-kanban", "kanban-*", "Kanban Board", 10, "session_label")
        add_rule(settings, tenant, "r-all", "*", "General", 0, "session_label")
        await app.state.project_rules.reload()
        first = [labelled("peakpaws-safety-review"), labelled("kanban-sync"), labelled("other")]
        cost_span = span("chat", semconv_chat(**{"gen_ai.usage.cost": 0.25}), start_ns=NOW_NS)
        r = await client.post("/otlp/v1/traces", content=export(first).SerializeToString(), headers=PB)
        assert r.status_code == 200
        r = await client.post(
            "/otlp/v1/traces",
            content=export([cost_span]).SerializeToString(),
            headers={**PB, "X-Spendstream-Client-Cost": "true"},
        )
        assert r.status_code == 200
        # a higher-priority agent rule, picked up by the gateway's reload loop (no restart)
        add_rule(settings, tenant, "r-agent", "reviewer-*", "Reviews", 20, "agent")
        deadline = time.monotonic() + 10
        while app.state.project_rules.for_tenant(tenant).project_for("reviewer-1", "peakpaws-x") != "Reviews":
            assert time.monotonic() < deadline, "rule change never reached the gateway"
            await asyncio.sleep(0.1)
        second = [labelled("peakpaws-x", agent="reviewer-1"), labelled("peakpaws-y")]
        r = await client.post("/otlp/v1/traces", content=export(second).SerializeToString(), headers=PB)
        assert r.status_code == 200
        # the event API applies the same rules to events without a project
        r = await client.post(
            "/v1/events",
            json={"event_id": "api-1", "provider": "openai", "model": "gpt-4o", "session_label": "kanban-board"},
        )
        assert r.status_code == 202, r.text

    rows = await asyncio.to_thread(stored, settings, 7)

    def project(s):
        return rows[f"otel-{s.trace_id.hex()}-{s.span_id.hex()}"]["project"]

    assert [project(s) for s in first] == ["PeakPaws", "Kanban Board", "General"]
    assert [project(s) for s in second] == ["Reviews", "PeakPaws"]
    assert rows["api-1"]["project"] == "Kanban Board"
    cost_row = rows[f"otel-{cost_span.trace_id.hex()}-{cost_span.span_id.hex()}"]
    assert (cost_row["price_source"], cost_row["cost_nanos"]) == ("client", 250_000_000)
    assert project(cost_span) == "General"  # no label: the catch-all


async def test_answers_otlp_exporters_act_on(make_settings):
    key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(
        with_clickhouse=False, bootstrap_admin_key=key, gateway={"max_body_bytes": 4096, "max_events_per_request": 5}
    )
    good = export([span("chat", semconv_chat(), start_ns=BASE_NS)]).SerializeToString()
    async with gateway(settings) as client:
        r = await client.post("/otlp/v1/traces", content=good, headers=PB)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert RpcStatus.FromString(r.content).code == 16
        auth = {"Authorization": f"Bearer {key}"}
        r = await client.post("/otlp/v1/traces", content=good, headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 415
        r = await client.post("/otlp/v1/traces", content=b"{", headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_otlp" and r.json()["field"] == "body"
        r = await client.post("/otlp/v1/traces", content=b"\xff\xff\xff", headers={**auth, **PB})
        assert r.status_code == 400 and "protobuf" in RpcStatus.FromString(r.content).message
        big = export([span("chat", semconv_chat(), start_ns=BASE_NS) for _ in range(50)]).SerializeToString()
        r = await client.post("/otlp/v1/traces", content=big, headers={**auth, **PB})
        assert r.status_code == 413
        bomb = gzip.compress(b"\0" * 100_000)
        r = await client.post("/otlp/v1/traces", content=bomb, headers={**auth, **PB, "Content-Encoding": "gzip"})
        assert r.status_code == 413
        r = await client.post("/otlp/v1/traces", content=good, headers={**auth, **PB, "Content-Encoding": "br"})
        assert r.status_code == 415
        # a span ending in the far future is refused by event validation: partial success
        future = export([span("chat", semconv_chat(), start_ns=time.time_ns() + 3600 * 10**9)]).SerializeToString()
        r = await client.post("/otlp/v1/traces", content=future, headers={**auth, **PB})
        assert r.status_code == 200
        partial = ExportTraceServiceResponse.FromString(r.content).partial_success
        assert partial.rejected_spans == 1 and "timestamp" in partial.error_message
        # more spans than a request may hold (gateway.max_events_per_request)
        many = export([span("execute_tool x", {"gen_ai.operation.name": "execute_tool"}) for _ in range(6)])
        r = await client.post("/otlp/v1/traces", content=many.SerializeToString(), headers={**auth, **PB})
        assert r.status_code == 413 and "6 spans" in RpcStatus.FromString(r.content).message
        # only agent/tool spans: nothing to store, accepted
        tool = export([span("execute_tool x", {"gen_ai.operation.name": "execute_tool"})])
        r = await client.post("/otlp/v1/traces", json=to_otlp_json(tool), headers=auth)
        assert r.status_code == 200 and r.json() == {}


async def test_broker_down_is_503_with_retry_after(make_settings, tmp_path):
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(
        with_clickhouse=False,
        bootstrap_admin_key=key,
        kafka={"bootstrap_servers": broker.bootstrap, "send_timeout_s": 2},
    )
    await ensure_topics(settings)
    good = export([span("chat", semconv_chat(), start_ns=BASE_NS)]).SerializeToString()
    try:
        async with gateway(settings, key) as client:
            r = await client.post("/otlp/v1/traces", content=good, headers=PB)
            assert r.status_code == 200
            broker.stop()
            r = await client.post("/otlp/v1/traces", content=good, headers=PB)
            assert r.status_code == 503, r.content
            assert r.headers["retry-after"] == "5"
            assert RpcStatus.FromString(r.content).code == 14  # UNAVAILABLE
    finally:
        broker.stop()


async def test_hostile_bodies_get_4xx_never_5xx(make_settings):
    import random

    key = "ss_test_" + secrets.token_urlsafe(16)
    settings = make_settings(with_clickhouse=False, bootstrap_admin_key=key)
    rng = random.Random(19)
    base = export(
        [span("chat", semconv_chat(**{"spendstream.tag.t": "v"}), start_ns=BASE_NS) for _ in range(3)]
    ).SerializeToString()
    base_json = orjson.dumps(to_otlp_json(export([span("chat", semconv_chat(), start_ns=BASE_NS)])))
    nested_pb = b"\x0a\x02" * 2000  # ever deeper length-delimited fields
    deep_value = "[" * 5000 + "]" * 5000
    bodies = [(nested_pb, PB["Content-Type"]), (deep_value.encode(), "application/json")]
    nested = {"kvlistValue": {"values": []}}
    inner = nested
    for _ in range(200):  # an attribute value nested 200 levels deep
        child = {"kvlistValue": {"values": []}}
        inner["kvlistValue"]["values"].append({"key": "k", "value": child})
        inner = child
    deep_attr = {
        "resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x", "attributes": [{"key": "a", "value": nested}]}]}]}]
    }
    bodies.append((json.dumps(deep_attr).encode(), "application/json"))
    for _ in range(150):
        raw = bytearray(base)
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        bodies.append((bytes(raw[: rng.randrange(1, len(raw) + 1)]), PB["Content-Type"]))
        js = bytearray(base_json)
        at = rng.randrange(len(js))
        js[at : at + rng.randrange(1, 4)] = rng.choice([b'"', b"{", b"]", b"1e999", b"null", b"-1", b'"zz"'])
        bodies.append((bytes(js), "application/json"))
    statuses = set()
    async with gateway(settings, key) as client:
        for body, ctype in bodies:
            r = await client.post("/otlp/v1/traces", content=body, headers={"Content-Type": ctype})
            assert r.status_code in (200, 400), (r.status_code, r.content[:300], body[:100])
            statuses.add(r.status_code)
        assert statuses == {200, 400}
        r = await client.post("/otlp/v1/traces", content=base, headers=PB)
        assert r.status_code == 200  # still serving
