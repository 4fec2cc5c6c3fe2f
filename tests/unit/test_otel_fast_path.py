"""The fast span reading (spendstream/otel: a ``TraceView`` of the encoded request, only the read
attributes decoded, a cache of decoded values) gives exactly what the documented rules give over the
fully decoded ``ExportTraceServiceRequest`` (``map_export_reference``), on a seeded corpus that uses
every attribute name the mapping reads, in every value type, with noise, duplicates and nesting."""

from __future__ import annotations

import random
import re
from pathlib import Path

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from otel_support import BASE_NS, export, merge, new_span_id, new_trace_id, span

from spendstream.otel import mapping
from spendstream.otel.mapping import READ_ATTRIBUTES, TAG_PREFIX, map_export, map_export_reference
from spendstream.otel.wire import decode_protobuf

DOCS = Path(__file__).resolve().parents[2] / "docs" / "otel.md"
#: read from the resource only (the resource is decoded whole on both paths)
RESOURCE_ONLY = {"service.name", "telemetry.sdk.name"}


def _values(rng: random.Random, name: str) -> list[object]:
    """Values of every type an emitter may send for ``name`` (valid, borderline and wrong)."""
    if "token" in name or "Tokens" in name or name.endswith((".cached", ".cache_write", ".reasoning")):
        valid = [rng.randrange(0, 4000), 0, float(rng.randrange(0, 900)), "640", " 77 "]
        return valid * 4 + [12.5, "many", -3, True]  # mostly valid: a span with a bad count is rejected
    if name == "gen_ai.usage.cost":
        return [0.0123, 3, "0.5", "abc", float("inf")]
    if name == "gen_ai.operation.name":
        return ["chat", "text_completion", "embeddings", "invoke_agent", "execute_tool", ""]
    if name == "ai.operationId":
        return ["ai.generateText", "ai.generateText.doGenerate", "ai.streamText.doStream"]
    if name == "openinference.span.kind":
        return ["LLM", "llm", "EMBEDDING", "CHAIN", "TOOL"]
    if name == "traceloop.span.kind":
        return ["workflow", "task", "agent", "tool", "llm"]
    if name == "llm.request.type":
        return ["chat", "completion", "embedding", "rerank"]
    if "provider" in name or "system" in name:
        return ["openai", "anthropic", "aws.bedrock", "gcp.vertex_ai", "openai.chat", "  ", "x_ai"]
    if "model" in name:
        return ["gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4-20250514", "gpt-4o", "", "   "]
    return [f"v-{rng.randrange(5)}", "", "  ", 7]


def _noise(rng: random.Random) -> dict[str, object]:
    return {
        "gen_ai.response.id": f"chatcmpl-{rng.randrange(10**9)}",
        "gen_ai.prompt.0.content": "x" * rng.randrange(0, 600),
        "http.status_code": 200,
    }


def _span_attrs(rng: random.Random, names: list[str]) -> dict[str, object]:
    attrs: dict[str, object] = {}
    for name in rng.sample(names, rng.randrange(1, 9)):
        attrs[name] = rng.choice(_values(rng, name))
    if rng.random() < 0.6:  # most spans are model calls of some dialect
        attrs.setdefault("gen_ai.operation.name", "chat")
        attrs.setdefault("gen_ai.request.model", rng.choice(["gpt-4o", "o3-mini"]))
        attrs.setdefault("gen_ai.usage.input_tokens", rng.randrange(0, 5000))
    if rng.random() < 0.4:
        attrs[f"{TAG_PREFIX}team"] = rng.choice(["blue", "red", 3])
    if rng.random() < 0.5:
        attrs.update(_noise(rng))
    return attrs


def _with_odd_values(s, rng: random.Random):
    """Attributes the typed helpers cannot write: arrays, no value at all, a key given twice."""
    if rng.random() < 0.3:
        name = rng.choice(sorted(READ_ATTRIBUTES))
        array = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")]))
        s.attributes.append(KeyValue(key=name, value=array))
    if rng.random() < 0.2:
        s.attributes.append(KeyValue(key=rng.choice(sorted(READ_ATTRIBUTES))))  # no value
    if rng.random() < 0.3 and len(s.attributes):
        first = s.attributes[0]
        s.attributes.append(KeyValue(key=first.key, value=AnyValue(string_value="again")))  # last one wins
    return s


def _corpus(seed: int):
    rng = random.Random(seed)
    names = sorted(READ_ATTRIBUTES)
    requests = []
    for _ in range(40):
        trace = new_trace_id()
        parent = new_span_id()
        agent = span(
            "invoke_agent",
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner", "session.id": "s-1"},
            trace_id=trace,
            span_id=parent,
        )
        spans = [agent]
        for _ in range(rng.randrange(1, 6)):
            s = span(
                "call",
                _span_attrs(rng, names),
                trace_id=trace,
                parent=parent if rng.random() < 0.5 else b"",
                start_ns=BASE_NS + rng.randrange(0, 10**12),
                duration_ms=rng.randrange(0, 5000),
                error=rng.random() < 0.2,
            )
            if rng.random() < 0.05:
                s.span_id = b"\x01\x02"  # cannot make an event id
            if rng.random() < 0.05:
                s.end_time_unix_nano = 0
            spans.append(_with_odd_values(s, rng))
        resource = {"service.name": rng.choice(["svc", "bot", ""])}
        for name in rng.sample(names, rng.randrange(0, 4)):
            resource[name] = rng.choice(_values(rng, name))
        if rng.random() < 0.3:
            resource["telemetry.sdk.name"] = "openlit"
        if rng.random() < 0.4:
            resource[f"{TAG_PREFIX}env"] = "prod"
        scope = rng.choice(["opentelemetry.instrumentation.openai_v2", "openlit.otel.tracing", "pydantic-ai"])
        requests.append(export(spans, resource, scope))
    # several resources in one export, ancestors across them
    requests.append(merge(*requests[:3]))
    return requests


def _same(request, client_cost: bool) -> None:
    body = request.SerializeToString()
    decoded = decode_protobuf(body)
    fast = map_export(decoded, client_cost=client_cost, body=body)
    reference = map_export_reference(decoded, client_cost=client_cost)
    assert (fast.spans, fast.ignored) == (reference.spans, reference.ignored)
    assert fast.rejected == reference.rejected
    assert fast.events == reference.events
    # without the body the request is encoded again: the same answer
    assert map_export(decoded, client_cost=client_cost).events == reference.events


def test_the_fast_reading_maps_every_span_as_the_reference_does():
    corpus = _corpus(seed=19)
    events = rejected = ignored = 0
    for request in corpus:
        _same(request, client_cost=False)
        _same(request, client_cost=True)
        mapped = map_export_reference(request)
        events, rejected, ignored = (
            events + len(mapped.events),
            rejected + len(mapped.rejected),
            ignored + mapped.ignored,
        )
    # the corpus exercises each outcome, not only the happy path
    assert events > 30 and rejected > 10 and ignored > 40


def test_cached_values_are_the_same_values_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(mapping, "VALUE_CACHE_SIZE", 8)
    mapping._VALUES.clear()
    for request in _corpus(seed=7)[:10]:
        for _ in range(2):  # the second pass reads from the cache
            _same(request, client_cost=True)
        assert len(mapping._VALUES) <= 8
    # equal numbers of different types are different encodings, never confused by the cache
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 1}
    as_int = export([span("c", attrs)])
    as_float = export([span("c", {**attrs, "gen_ai.usage.input_tokens": 1.0})])
    as_bool = export([span("c", {**attrs, "gen_ai.usage.input_tokens": True})])
    assert map_export(as_int).events[0]["input_tokens"] == 1
    assert map_export(as_float).events[0]["input_tokens"] == 1
    assert map_export(as_bool).rejected and not map_export(as_bool).events


def test_every_attribute_the_docs_name_is_read():
    documented = set(
        re.findall(
            r"`((?:gen_ai|llm|ai|openinference|traceloop|user|enduser|session|spendstream)\.[\w.]+)`", DOCS.read_text()
        )
    )
    documented = {name for name in documented if not name.startswith(TAG_PREFIX)} - {"ai.generateText"}  # a value
    assert documented - RESOURCE_ONLY <= READ_ATTRIBUTES, documented - RESOURCE_ONLY - READ_ATTRIBUTES


def test_unread_attributes_are_never_decoded(monkeypatch):
    decoded: list[bytes] = []
    real = mapping._decoded
    monkeypatch.setattr(mapping, "_decoded", lambda raw: decoded.append(raw) or real(raw))
    mapping._VALUES.clear()
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.prompt.0.content": "secret " * 100}
    (ev,) = map_export(export([span("c", attrs)])).events
    assert ev["model"] == "m"
    assert decoded and not any(b"secret" in raw for raw in decoded)


def test_token_counts_of_every_type_read_as_documented():
    base = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    cases = [(5, 5), (2.0, 2), ("7", 7), (" 8 ", 8), (0, 0), (-3, None), (True, None), (2.5, None), (10**9, None)]
    for value, expected in cases:
        mapped = map_export(export([span("c", {**base, "gen_ai.usage.input_tokens": value})]))
        if expected is None:
            assert not mapped.events and "gen_ai.usage.input_tokens must be an integer" in mapped.rejected[0][1], value
        else:
            assert mapped.events[0]["input_tokens"] == expected, value
    # a first name without a scalar value gives way to the next name (the deprecated one)
    s = span("c", {**base, "gen_ai.usage.prompt_tokens": 40})
    s.attributes.append(KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(array_value=ArrayValue())))
    assert map_export(export([s])).events[0]["input_tokens"] == 40
