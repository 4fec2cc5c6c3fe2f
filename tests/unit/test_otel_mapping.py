"""OTLP GenAI spans -> usage events (spendstream/otel): one real-shaped span per emitter family of
WIRE-CONTRACTS.md section 2, agent/tool spans, inheritance, ids, and the wire decoding."""

from __future__ import annotations

import gzip

import orjson
import pytest
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

from ingest_gateway import logic
from spendstream.otel import OtlpDecodeError, decode_json, decode_protobuf, map_export
from spendstream.otel.wire import RpcStatus, export_response
from spendstream.project_mappings import Rule, RuleSet


def one(request, **kw):
    mapped = map_export(request, **kw)
    assert not mapped.rejected, mapped.rejected
    assert len(mapped.events) == 1, mapped.events
    return mapped.events[0]


def test_semconv_chat_span_becomes_one_event_with_ids_times_and_attribution():
    trace_id, span_id = new_trace_id(), new_span_id()
    s = span(
        "chat gpt-4o",
        semconv_chat(
            **{
                "gen_ai.usage.cache_read.input_tokens": 1024,
                "gen_ai.usage.reasoning.output_tokens": 0,
                "gen_ai.conversation.id": "conv-1",
                "gen_ai.agent.name": "triage",
                "user.id": "u-7",
                "spendstream.project": "support",
                "spendstream.tag.team": "blue",
                "spendstream.session.label": "peakpaws-safety-review",
                "spendstream.session.type": "subagent",
            }
        ),
        trace_id=trace_id,
        span_id=span_id,
        duration_ms=1234,
    )
    ev = one(export([s], {"service.name": "bot", "spendstream.tag.env": "prod"}))
    assert ev == {
        "event_id": f"otel-{trace_id.hex()}-{span_id.hex()}",
        "model": "gpt-4o-2024-08-06",  # response model before request model
        "provider": "openai",
        "operation": "chat",
        "status": "ok",
        "input_tokens": 1200,  # semconv input already includes the cache read
        "output_tokens": 300,
        "cache_read_tokens": 1024,
        "timestamp": "2025-06-01T10:00:01.234Z",  # the span's end
        "latency_ms": 1234,
        "project": "support",
        "agent": "triage",
        "user": "u-7",
        "session_id": "conv-1",
        "session_label": "peakpaws-safety-review",
        "session_type": "subagent",
        "tags": {"env": "prod", "team": "blue"},
    }


def test_deprecated_names_gen_ai_system_and_prompt_completion_tokens():
    ev = one(export([span("openai.chat", legacy_openllmetry_chat(), error=True)]))
    assert (ev["provider"], ev["model"], ev["operation"], ev["status"]) == (
        "openai", "gpt-4o-mini-2024-07-18", "chat", "error"
    )  # fmt: skip
    assert (ev["input_tokens"], ev["output_tokens"], ev["cache_read_tokens"]) == (2000, 150, 1024)
    assert ev["agent"] == "svc"  # resource service.name when no gen_ai.agent.name


def test_cache_creation_and_its_new_name_cache_write_and_reasoning():
    old = one(export([span("chat", semconv_chat(**{"gen_ai.usage.cache_creation.input_tokens": 500}))]))
    new = one(export([span("chat", semconv_chat(**{"gen_ai.usage.cache_write.input_tokens": 500}))]))
    assert old["cache_write_tokens"] == new["cache_write_tokens"] == 500
    assert old["input_tokens"] == new["input_tokens"] == 1200  # included already: not added
    reasoning = one(
        export([span("chat o3-mini", semconv_chat("o3-mini", **{"gen_ai.usage.reasoning.output_tokens": 256}))])
    )
    assert (reasoning["output_tokens"], reasoning["reasoning_tokens"]) == (300, 256)


def test_pydantic_ai_dialect():
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-0",
        "gen_ai.response.model": "claude-sonnet-4-20250514",
        "gen_ai.usage.input_tokens": 5000,  # pydantic-ai sums Anthropic's parts into input
        "gen_ai.usage.output_tokens": 400,
        "gen_ai.usage.details.cache_read_tokens": 3000,
        "gen_ai.usage.details.cache_write_tokens": 1000,
        "gen_ai.agent.name": "planner",
    }
    ev = one(export([span("chat claude-sonnet-4-0", attrs)], scope="pydantic-ai"))
    assert (ev["provider"], ev["input_tokens"], ev["cache_read_tokens"], ev["cache_write_tokens"]) == (
        "anthropic", 5000, 3000, 1000
    )  # fmt: skip


def test_sentry_dialect():
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 900,
        "gen_ai.usage.input_tokens.cached": 100,
        "gen_ai.usage.input_tokens.cache_write": 50,
        "gen_ai.usage.output_tokens": 90,
        "gen_ai.usage.output_tokens.reasoning": 30,
    }
    ev = one(export([span("chat gpt-4o", attrs)], scope="sentry"))
    assert (ev["input_tokens"], ev["cache_read_tokens"], ev["cache_write_tokens"], ev["reasoning_tokens"]) == (
        900, 100, 50, 30
    )  # fmt: skip


def test_openinference_dialect_and_its_chain_spans():
    llm = {
        "openinference.span.kind": "LLM",
        "llm.provider": "openai",
        "llm.model_name": "gpt-4o-mini",
        "llm.token_count.prompt": 700,
        "llm.token_count.completion": 70,
        "llm.token_count.prompt_details.cache_read": 200,
        "llm.token_count.completion_details.reasoning": 10,
    }
    chain = {"openinference.span.kind": "CHAIN", "llm.token_count.prompt": 700, "llm.model_name": "gpt-4o-mini"}
    mapped = map_export(export([span("ChatCompletion", llm), span("RunnableSequence", chain)]))
    (ev,) = mapped.events
    assert mapped.ignored == 1
    assert (ev["operation"], ev["input_tokens"], ev["cache_read_tokens"], ev["reasoning_tokens"]) == (
        "chat", 700, 200, 10
    )  # fmt: skip


def test_openlit_anthropic_reports_uncached_input_which_is_normalised_once():
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-3-5-sonnet-20241022",
        "gen_ai.usage.input_tokens": 40,  # Anthropic's uncached count, as OpenLIT forwards it
        "gen_ai.usage.output_tokens": 500,
        "gen_ai.usage.cache_read_input_tokens": 20,
        "gen_ai.usage.cache_creation_input_tokens": 10,
        "gen_ai.usage.cost": 0.0123456789012,
    }
    resource = {"service.name": "agent", "telemetry.sdk.name": "openlit"}
    ev = one(export([span("chat claude", attrs)], resource, scope="openlit.otel.tracing"))
    assert (ev["input_tokens"], ev["cache_read_tokens"], ev["cache_write_tokens"]) == (70, 20, 10)
    assert "cost_usd" not in ev  # default: Spendstream prices it
    opted_in = one(export([span("chat claude", attrs)], resource, scope="openlit"), client_cost=True)
    assert opted_in["cost_usd"] == "0.012345679"  # rounded half-even to the nano-USD
    # the same counts from an emitter that follows semconv (inclusive input) are left as they are
    attrs_inclusive = {**attrs, "gen_ai.usage.input_tokens": 70}
    assert one(export([span("chat", attrs_inclusive)]))["input_tokens"] == 70


def test_cache_parts_above_the_input_prove_an_exclusive_count():
    attrs = semconv_chat(**{"gen_ai.usage.input_tokens": 5, "gen_ai.usage.cache_read.input_tokens": 1000})
    ev = one(export([span("chat", attrs)]))
    assert (ev["input_tokens"], ev["cache_read_tokens"]) == (1005, 1000)


def test_vercel_ai_sdk_counts_only_the_provider_call_not_the_outer_span():
    trace = new_trace_id()
    outer_id = new_span_id()
    outer = span(
        "ai.generateText",
        {
            "ai.operationId": "ai.generateText",
            "ai.model.provider": "openai.chat",
            "ai.model.id": "gpt-4o",
            "ai.usage.promptTokens": 800,
            "ai.usage.completionTokens": 80,
        },
        trace_id=trace,
        span_id=outer_id,
    )
    inner = span(
        "ai.generateText.doGenerate",
        {
            "ai.operationId": "ai.generateText.doGenerate",
            "ai.model.provider": "openai.chat",
            "ai.model.id": "gpt-4o",
            "ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.system": "openai.chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 800,
            "gen_ai.usage.output_tokens": 80,
        },
        trace_id=trace,
        parent=outer_id,
    )
    mapped = map_export(export([outer, inner], scope="ai"))
    (ev,) = mapped.events
    assert mapped.ignored == 1
    assert (ev["provider"], ev["model"], ev["operation"], ev["input_tokens"]) == (
        "openai", "gpt-4o-2024-08-06", "ai.generateText.doGenerate", 800
    )  # fmt: skip


def test_agent_and_tool_spans_never_add_cost_and_children_inherit_agent_and_conversation():
    trace = new_trace_id()
    agent_id, tool_id = new_span_id(), new_span_id()
    agent = span(
        "invoke_agent planner",
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": "planner",
            "gen_ai.conversation.id": "c-9",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o",
            # agent spans may repeat the summed usage of their children: never counted
            "gen_ai.usage.input_tokens": 3000,
            "gen_ai.usage.output_tokens": 600,
        },
        trace_id=trace,
        span_id=agent_id,
    )
    tool = span(
        "execute_tool search",
        {"gen_ai.operation.name": "execute_tool"},
        trace_id=trace,
        span_id=tool_id,
        parent=agent_id,
    )
    chat1 = span("chat gpt-4o", semconv_chat(), trace_id=trace, parent=agent_id)
    chat2 = span("chat gpt-4o", semconv_chat(), trace_id=trace, parent=tool_id)  # nested two levels down
    mapped = map_export(export([chat1, tool, chat2, agent]))  # children end (and export) first
    assert mapped.spans == 4 and mapped.ignored == 2 and len(mapped.events) == 2
    assert {ev["agent"] for ev in mapped.events} == {"planner"}
    assert {ev["session_id"] for ev in mapped.events} == {"c-9"}
    assert sum(ev["input_tokens"] for ev in mapped.events) == 2400


def test_a_re_exported_span_keeps_its_event_id():
    s = span("chat", semconv_chat())
    first, again = map_export(export([s])), map_export(export([s]))
    assert first.events[0]["event_id"] == again.events[0]["event_id"]


def test_spans_that_cannot_be_events_are_rejected_with_their_reason():
    no_model = span("chat", {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 5})
    bad_count = span("chat", semconv_chat(**{"gen_ai.usage.input_tokens": -3}))
    text_count = span("chat", semconv_chat(**{"gen_ai.usage.output_tokens": "lots"}))
    ok = span("chat", semconv_chat(**{"gen_ai.usage.input_tokens": "12"}))  # numeric strings are read
    mapped = map_export(export([no_model, bad_count, text_count, ok]))
    assert len(mapped.events) == 1 and mapped.events[0]["input_tokens"] == 12
    reasons = [r for _, r in mapped.rejected]
    assert "without gen_ai.response.model" in reasons[0]
    assert "gen_ai.usage.input_tokens must be an integer" in reasons[1]
    assert "gen_ai.usage.output_tokens" in reasons[2]


def test_semconv_provider_names_map_to_catalog_providers():
    for name, want in (("aws.bedrock", "aws"), ("gcp.vertex_ai", "google"), ("azure.ai.openai", "azure"),
                       ("mistral_ai", "mistral"), ("x_ai", "x-ai"), ("anthropic", "anthropic")):  # fmt: skip
        ev = one(export([span("chat", semconv_chat(**{"gen_ai.provider.name": name}))]))
        assert ev["provider"] == want, name


def test_mapped_events_pass_the_gateways_event_validation_and_rules_apply():
    spans = [
        span("chat", semconv_chat(**{"spendstream.session.label": "peakpaws-safety-review"})),
        span("chat", semconv_chat(**{"gen_ai.usage.cache_read.input_tokens": 1200})),
        span("chat", semconv_chat(**{"spendstream.session.type": "x" * 65})),  # too long a session_type
    ]
    mapped = map_export(export(spans))
    rules = RuleSet([Rule("r1", "peakpaws-*", "PeakPaws", 10, "session_label")])
    for ev in mapped.events:
        ev.setdefault("project", rules.project_for(ev.get("agent"), ev.get("session_label")) or "default")
    result = logic.validate_objects(mapped.events, logic.RequestContext(BASE_NS + 10**9))
    assert result.accepted == 2
    assert sorted(result.by_project) == ["PeakPaws", "default"]
    (rejected,) = result.rejected
    assert rejected["index"] == 2 and rejected["errors"][0]["field"] == "session_type"


# ---------------------------------------------------------------- wire


def test_protobuf_and_otlp_json_decode_to_the_same_request():
    request = merge(export([span("chat", semconv_chat())]), export([span("chat", legacy_openllmetry_chat())]))
    from_pb = decode_protobuf(request.SerializeToString())
    from_json = decode_json(orjson.dumps(to_otlp_json(request)))
    assert from_pb == request == from_json
    assert map_export(from_json).events == map_export(request).events


def test_bad_bodies_name_what_is_wrong():
    with pytest.raises(OtlpDecodeError):
        decode_protobuf(b"\xff\xff\xff\xff")
    with pytest.raises(OtlpDecodeError, match="malformed JSON"):
        decode_json(b"{")
    with pytest.raises(OtlpDecodeError) as exc:
        decode_json(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}')
    assert exc.value.field == "resourceSpans[0].scopeSpans[0].spans[0].traceId"
    with pytest.raises(OtlpDecodeError):
        decode_json(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5, "kind": "x"}]}]}]}')
    with pytest.raises(OtlpDecodeError):
        decode_json(gzip.compress(b"{}"))
    # unknown fields are ignored, as OTLP receivers must
    assert decode_json(b'{"resourceSpans": [], "futureField": 1}').resource_spans == []


def test_answers_in_both_encodings():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    assert export_response(0, "", as_json=True) == b"{}"
    assert export_response(0, "", as_json=False) == b""
    body = orjson.loads(export_response(2, "2 rejected", as_json=True))
    assert body == {"partialSuccess": {"rejectedSpans": "2", "errorMessage": "2 rejected"}}
    parsed = ExportTraceServiceResponse.FromString(export_response(2, "2 rejected", as_json=False))
    assert (parsed.partial_success.rejected_spans, parsed.partial_success.error_message) == (2, "2 rejected")
    status = RpcStatus.FromString(RpcStatus(code=3, message="bad").SerializeToString())
    assert (status.code, status.message) == (3, "bad")
