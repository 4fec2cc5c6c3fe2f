"""The fast span reading and the gateway's direct event building give exactly what the documented
rules give over the fully decoded ``ExportTraceServiceRequest``, on a seeded corpus that uses every
attribute name the mapping reads, in every value type, with noise, duplicates, nesting, values at
and past every ``Event`` limit, project mapping rules and client cost:

- ``map_export`` (a ``TraceView`` of the encoded request, each attribute encoding decoded once)
  against ``map_export_reference`` (every attribute decoded);
- ``otlp_events.map_and_validate`` (the OTLP handler: finished ``Event`` structs built from the
  view) against the previous handler (``map_export_reference`` event objects, the project rules,
  ``logic.validate_objects``): the same events, rejections, reasons and counts;
- which bodies are valid: the view, with each attribute encoding checked as it is decoded, turns
  down exactly the bodies ``ExportTraceServiceRequest`` turns down, with the same error.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from otel_support import BASE_NS, export, merge, new_span_id, new_trace_id, semconv_chat, span

from ingest_gateway import logic, otlp_events
from ingest_gateway.errors import BodyError
from spendstream.otel import mapping
from spendstream.otel.mapping import READ_ATTRIBUTES, TAG_PREFIX, map_export, map_export_reference
from spendstream.otel.wire import OtlpDecodeError, TraceView, decode_protobuf
from spendstream.project_mappings import Rule, RuleSet

DOCS = Path(__file__).resolve().parents[2] / "docs" / "otel.md"
#: read from the resource only (the resource is decoded whole on both paths)
RESOURCE_ONLY = {"service.name", "telemetry.sdk.name"}
#: "now" of the validation: the corpus's spans start at BASE_NS + up to 1000 s; some end later
NOW_NS = BASE_NS + 600 * 10**9
RULES = RuleSet(
    [
        Rule("r1", "peakpaws-*", "PeakPaws", 10, "session_label"),
        Rule("r2", "planner*", "Planning", 5, "agent"),
        Rule("r3", "bot-huge", "x" * 129, 4, "agent"),  # a project the Event refuses: rejected either way
        Rule("r4", "*", "General", 0, "agent"),
    ]
)


def _values(rng: random.Random, name: str) -> list[object]:
    """Values of every type an emitter may send for ``name`` (valid and borderline)."""
    if "token" in name or "Tokens" in name or name.endswith((".cached", ".cache_write", ".reasoning")):
        return [rng.randrange(0, 4000), rng.randrange(0, 4000), 0, float(rng.randrange(0, 900)), "640", " 77 "]
    if name == "gen_ai.usage.cost":
        return [0.0123, 3, "0.5"]
    if name == "gen_ai.operation.name":
        return ["chat", "chat", "text_completion", "embeddings", "invoke_agent", "execute_tool", ""]
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
        return ["gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4-20250514", "openai/gpt-4o", "", "   "]
    if name == "spendstream.session.type":
        return ["main", "subagent"]
    if name == "spendstream.project":
        return ["Kanban Board", "  "]
    if name == "spendstream.session.label":
        return ["peakpaws-safety-review", "kanban-7"]
    return [f"v-{rng.randrange(5)}", "planner-2", "", "  ", 7]


#: values past a limit (of the mapping or of the Event), sent now and then
_BAD = {
    "count": [12.5, "many", -3, True, 10**9],
    "gen_ai.usage.cost": ["abc", float("inf"), 10**6],
    "gen_ai.operation.name": ["x" * 300],
    "provider": ["p" * 300, "."],
    "model": ["m" * 257],
    "spendstream.session.type": ["t" * 65],
    "spendstream.project": ["p" * 129],
    "spendstream.session.label": ["l" * 257],
    "gen_ai.agent.name": ["a" * 129],
    "other": ["a" * 257],
}


def _pick(rng: random.Random, name: str) -> object:
    if rng.random() < 0.1:
        if "token" in name or "Tokens" in name or name.endswith((".cached", ".cache_write", ".reasoning")):
            return rng.choice(_BAD["count"])
        if "provider" in name or "system" in name:
            return rng.choice(_BAD["provider"])
        if "model" in name:
            return rng.choice(_BAD["model"])
        return rng.choice(_BAD.get(name, _BAD["other"]))
    return rng.choice(_values(rng, name))


def _noise(rng: random.Random) -> dict[str, object]:
    return {
        "gen_ai.response.id": f"chatcmpl-{rng.randrange(10**9)}",
        "gen_ai.prompt.0.content": "x" * rng.randrange(0, 600),
        "http.status_code": 200,
    }


def _tags(rng: random.Random) -> dict[str, object]:
    roll = rng.random()
    if roll < 0.04:  # more tags than an event takes
        return {f"{TAG_PREFIX}k{i}": "v" for i in range(33)}
    if roll < 0.08:
        return {f"{TAG_PREFIX}{'k' * 129}": "v", f"{TAG_PREFIX}long": "v" * 257}
    return {f"{TAG_PREFIX}team": rng.choice(["blue", "red", 3, 2.5, True])}


def _span_attrs(rng: random.Random, names: list[str]) -> dict[str, object]:
    attrs: dict[str, object] = {}
    for name in rng.sample(names, rng.randrange(1, 9)):
        attrs[name] = _pick(rng, name)
    if rng.random() < 0.6:  # most spans are model calls of some dialect
        attrs.setdefault("gen_ai.operation.name", "chat")
        attrs.setdefault("gen_ai.request.model", rng.choice(["gpt-4o", "o3-mini"]))
        attrs.setdefault("gen_ai.provider.name", rng.choice(["openai", "anthropic"]))
        attrs.setdefault("gen_ai.usage.input_tokens", rng.randrange(0, 5000))
        attrs.setdefault("gen_ai.usage.output_tokens", rng.randrange(0, 9000))
    if rng.random() < 0.4:
        attrs.update(_tags(rng))
    if rng.random() < 0.1:
        attrs["spendstream.session.type"] = rng.choice(["subagent", "t" * 65])
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


def _corpus(seed: int, n: int = 40):
    rng = random.Random(seed)
    names = sorted(READ_ATTRIBUTES)
    requests = []
    for _ in range(n):
        trace = new_trace_id()
        parent = new_span_id()
        agent = span(
            "invoke_agent",
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner", "session.id": "s-1"},
            trace_id=trace,
            span_id=parent,
        )
        spans = [agent]
        for _ in range(rng.randrange(1, 8)):
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
            if rng.random() < 0.03:
                s.start_time_unix_nano = s.end_time_unix_nano = 0  # no time at all: received now
            spans.append(_with_odd_values(s, rng))
        resource = {"service.name": rng.choice(["svc", "bot", "", "planner-x", "svc", "bot", "s" * 129, "bot-huge"])}
        for name in rng.sample(names, rng.randrange(0, 4)):
            resource[name] = _pick(rng, name)
        if rng.random() < 0.3:
            resource["telemetry.sdk.name"] = "openlit"
        if rng.random() < 0.4:
            resource[f"{TAG_PREFIX}env"] = rng.choice(["prod", "prod", "prod", "e" * 257])
        scope = rng.choice(["opentelemetry.instrumentation.openai_v2", "openlit.otel.tracing", "pydantic-ai"])
        requests.append(export(spans, resource, scope))
    # several resources in one export, ancestors across them
    requests.append(merge(*requests[:3]))
    return requests


def _forget() -> None:
    """Empty the caches of decoded attribute encodings."""
    mapping._PAIRS.clear()
    mapping._ONCE.clear()


def _same_mapping(request, client_cost: bool) -> None:
    body = request.SerializeToString()
    decoded = decode_protobuf(body)
    fast = map_export(decoded, client_cost=client_cost, body=body)
    reference = map_export_reference(decoded, client_cost=client_cost)
    assert (fast.spans, fast.ignored) == (reference.spans, reference.ignored)
    assert fast.rejected == reference.rejected
    assert fast.events == reference.events
    # without the body the request is encoded again: the same answer
    assert map_export(decoded, client_cost=client_cost).events == reference.events


def _previous_handler(body: bytes, client_cost: bool, rules: RuleSet, default_project: str):
    """What the OTLP handler did before it built events directly: event objects by the rules,
    the project rules, then the event API's validation of objects."""
    mapped = map_export_reference(decode_protobuf(body), client_cost=client_cost)
    for ev in mapped.events:
        if "project" not in ev:
            ev["project"] = rules.project_for(ev.get("agent", "default"), ev.get("session_label")) or default_project
    result = logic.validate_objects(mapped.events, logic.RequestContext(NOW_NS))
    return mapped, result


def _same_handling(body: bytes, client_cost: bool, rules: RuleSet = RULES, default_project: str = "default"):
    mapped, result = otlp_events.map_and_validate(
        body,
        client_cost=client_cost,
        max_spans=10_000,
        rules=rules,
        default_project=default_project,
        ctx=logic.RequestContext(NOW_NS),
    )
    ref_mapped, ref_result = _previous_handler(body, client_cost, rules, default_project)
    assert (mapped.spans, mapped.ignored) == (ref_mapped.spans, ref_mapped.ignored)
    assert mapped.rejected == ref_mapped.rejected
    assert result.rejected == ref_result.rejected
    assert result.event_ids == ref_result.event_ids
    assert result.by_project == ref_result.by_project
    # and the events encode to the same bytes, key order included (what the pricing stage reads)
    for project, events in result.by_project.items():
        assert [logic.encode(ev) for ev in events] == [logic.encode(ev) for ev in ref_result.by_project[project]]
    return result, mapped


def test_the_fast_reading_maps_every_span_as_the_reference_does():
    corpus = _corpus(seed=19)
    events = rejected = ignored = 0
    for request in corpus:
        _same_mapping(request, client_cost=False)
        _same_mapping(request, client_cost=True)
        mapped = map_export_reference(request)
        events, rejected, ignored = (
            events + len(mapped.events),
            rejected + len(mapped.rejected),
            ignored + mapped.ignored,
        )
    # the corpus exercises each outcome, not only the happy path
    assert events > 30 and rejected > 10 and ignored > 40


def test_the_handler_builds_the_events_the_previous_handler_validated():
    accepted = mapping_rejected = validation_rejected = 0
    fields: set[str] = set()
    for seed in (19, 20):
        for request in _corpus(seed=seed):
            body = request.SerializeToString()
            for client_cost in (False, True):
                result, mapped = _same_handling(body, client_cost)
                accepted += result.accepted
                mapping_rejected += len(mapped.rejected)
                validation_rejected += len(result.rejected)
                fields.update(r["errors"][0]["field"] for r in result.rejected)
    # every outcome, and rejections by the Event limits and _finish, not only by the mapping
    assert accepted > 100 and mapping_rejected > 20 and validation_rejected > 20, (
        accepted,
        mapping_rejected,
        validation_rejected,
    )
    assert {"project", "agent", "session_type", "model", "provider", "tags", "timestamp"} <= fields, fields


def test_the_handler_matches_on_the_common_dialects_and_without_rules():
    trace, agent_id = new_trace_id(), new_span_id()
    spans = [
        span(
            "invoke_agent",
            {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner"},
            trace_id=trace,
            span_id=agent_id,
        ),
        span("chat", semconv_chat(**{"gen_ai.usage.cache_read.input_tokens": 200}), trace_id=trace, parent=agent_id),
        span("chat", semconv_chat(**{"gen_ai.usage.reasoning.output_tokens": 100, "gen_ai.conversation.id": "c"})),
        span(
            "chat",
            semconv_chat(**{"gen_ai.usage.cache_write.input_tokens": 50, "spendstream.session.label": "peakpaws-x"}),
        ),
        span("chat", {**semconv_chat(), "gen_ai.system": "anthropic", "gen_ai.provider.name": ""}),
        span("chat", semconv_chat(**{"gen_ai.usage.output_tokens": 5, "gen_ai.usage.reasoning.output_tokens": 9})),
        span(
            "chat", semconv_chat(**{"gen_ai.request.model": "openai/gpt-4o", "gen_ai.response.model": ""}), error=True
        ),
    ]
    openlit = span("chat", {**semconv_chat("claude-sonnet-4-20250514"), "gen_ai.system": "anthropic",
                            "gen_ai.usage.input_tokens": 10, "gen_ai.usage.cache_read_input_tokens": 1000})  # fmt: skip
    request = merge(
        export(spans, {"service.name": "svc", f"{TAG_PREFIX}env": "prod"}),
        export([openlit], {"service.name": "lit", "telemetry.sdk.name": "openlit"}, scope="openlit.otel.tracing"),
    )
    body = request.SerializeToString()
    for rules in (RULES, RuleSet([])):
        for client_cost in (False, True):
            result, mapped = _same_handling(body, client_cost, rules, "fallback")
            assert result.accepted == 6 and len(result.rejected) == 1  # output below its reasoning part
    events = [ev for group in result.by_project.values() for ev in group]
    assert {ev.project for ev in events} == {"fallback"}
    (lit,) = [ev for ev in events if ev.agent == "lit"]
    assert (lit.input_tokens, lit.cache_read_tokens) == (1010, 1000)  # uncached input: cache added once


def test_a_tenants_rules_and_default_project_reach_the_built_events():
    spans = [
        span("chat", semconv_chat(**{"spendstream.session.label": "peakpaws-safety-review"})),
        span("chat", semconv_chat(**{"gen_ai.agent.name": "planner-7"})),
        span("chat", semconv_chat(**{"spendstream.project": "Kanban Board"})),
        span("chat", semconv_chat()),
    ]
    body = export(spans, {"service.name": "svc"}).SerializeToString()
    result, _ = _same_handling(body, False)
    assert {p: len(evs) for p, evs in result.by_project.items()} == {
        "PeakPaws": 1,
        "Planning": 1,
        "Kanban Board": 1,
        "General": 1,
    }


def test_cached_values_are_the_same_values_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(mapping, "PAIR_CACHE_SIZE", 8)
    _forget()
    for request in _corpus(seed=7)[:10]:
        for _ in range(3):  # later passes read from the caches (seen once, then kept)
            _same_mapping(request, client_cost=True)
            _same_handling(request.SerializeToString(), client_cost=True)
        assert len(mapping._PAIRS) <= 8 and len(mapping._ONCE) <= 8
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


def test_unread_attribute_values_are_never_converted_nor_long_encodings_kept(monkeypatch):
    converted: list[object] = []
    real = mapping._value
    monkeypatch.setattr(mapping, "_value", lambda v: converted.append(real(v)) or real(v))
    _forget()
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.prompt.0.content": "secret " * 100}
    (ev,) = map_export(export([span("c", attrs)])).events
    assert ev["model"] == "m"
    assert converted and not any("secret" in str(value) for value in converted)
    assert not any(b"secret" in raw for raw in (*mapping._PAIRS, *mapping._ONCE))


def test_token_counts_of_every_type_read_as_documented():
    base = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    cases = [(5, 5), (2.0, 2), ("7", 7), (" 8 ", 8), (0, 0), (-3, None), (True, None), (2.5, None), (10**9, None)]
    for value, expected in cases:
        mapped = map_export(export([span("c", {**base, "gen_ai.usage.input_tokens": value})]))
        if expected is None:
            assert not mapped.events and "gen_ai.usage.input_tokens must be an integer" in mapped.rejected[0][1], value
        else:
            assert mapped.events[0]["input_tokens"] == expected, value
        _same_handling(export([span("c", {**base, "gen_ai.usage.input_tokens": value})]).SerializeToString(), False)
    # a first name without a scalar value gives way to the next name (the deprecated one)
    s = span("c", {**base, "gen_ai.usage.prompt_tokens": 40})
    s.attributes.append(KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(array_value=ArrayValue())))
    assert map_export(export([s])).events[0]["input_tokens"] == 40
    _same_handling(export([s]).SerializeToString(), False)


# ---------------------------------------------------------------- which bodies are valid


def _outcome(call):
    try:
        return call()
    except OtlpDecodeError as exc:
        return ("400", exc.message, exc.field)
    except BodyError as exc:
        return (str(exc.status), exc.code)


def _handled(body: bytes, max_spans: int = 10_000):
    mapped, result = otlp_events.map_and_validate(
        body, client_cost=False, max_spans=max_spans, rules=RULES, default_project="d", ctx=logic.RequestContext(NOW_NS)
    )
    return mapped.spans, mapped.rejected, result.event_ids, result.rejected


def _previously(body: bytes, max_spans: int = 10_000):
    request = decode_protobuf(body)
    spans = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
    if spans > max_spans:
        raise BodyError(413, "too_many_spans", "")
    mapped, result = _previous_handler(body, False, RULES, "d")
    return mapped.spans, mapped.rejected, result.event_ids, result.rejected


def test_the_view_turns_down_exactly_the_bodies_the_request_class_does():
    rng = random.Random(19)
    attrs = semconv_chat(**{f"{TAG_PREFIX}t": "v", "gen_ai.conversation.id": "c-1"})
    base = export([span("chat", attrs, start_ns=BASE_NS) for _ in range(3)]).SerializeToString()
    outcomes = set()
    for _ in range(400):
        raw = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        body = bytes(raw[: rng.randrange(1, len(raw) + 1)] if rng.random() < 0.2 else raw)
        _forget()  # decoded for the first time: the view checks each attribute itself
        expected = _outcome(lambda body=body: _previously(body))
        assert _outcome(lambda body=body: _handled(body)) == expected
        assert _outcome(lambda body=body: _handled(body)) == expected  # and from the caches
        assert _outcome(lambda body=body: _handled(body)) == expected
        outcomes.add(type(expected) is tuple and expected[0] == "400")
    assert outcomes == {True, False}  # both valid and invalid bodies were tried
    # an attribute that is not valid UTF-8 inside, and one that is not a KeyValue at all
    bad_utf8 = export([span("chat", semconv_chat(**{"gen_ai.agent.name": "\u00e9"}))]).SerializeToString()
    bad_utf8 = bad_utf8.replace("\u00e9".encode(), b"\xff\xfe")
    not_kv = export([span("chat", semconv_chat())]).SerializeToString().replace(b"\x0a\x15gen_ai", b"\x0b\x15gen_ai")
    # a span status (read as its encoding by the view) whose message is not UTF-8, and a valid one
    with_status = span("chat", semconv_chat(), error=True)
    with_status.status.message = "\u00e9t\u00e9"
    good_status = export([with_status]).SerializeToString()
    bad_status = good_status.replace("\u00e9t\u00e9".encode(), b"\xfft\xfe\xff")
    for body in (bad_utf8, not_kv, good_status, bad_status):
        _forget()
        for _ in range(3):  # the first decode, then the caches
            assert _outcome(lambda body=body: _handled(body)) == _outcome(lambda body=body: _previously(body))
    assert _outcome(lambda: _previously(bad_status))[0] == "400"
    _, result = otlp_events.map_and_validate(
        good_status, client_cost=False, max_spans=10, rules=RULES, default_project="d", ctx=logic.RequestContext(NOW_NS)
    )
    ((ev,),) = result.by_project.values()
    assert ev.status == "error"
    assert _outcome(lambda: _handled(base, max_spans=2)) == ("413", "too_many_spans")


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (the test writes values nested deeper than the message
    classes let it build)."""
    n, size = len(payload), b""
    while True:
        size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return bytes([field << 3 | 2]) + size + payload


@pytest.mark.parametrize("depth", [1, 19, 20, 21, 37, 38, 39, 40, 100])  # protobuf refuses 39 here
def test_nested_attribute_values_are_judged_as_the_request_class_judges_them(depth):
    value = _ld(1, b"leaf")  # AnyValue.string_value
    for level in range(depth):
        if level % 2:  # AnyValue.array_value = 5 {values = 1}
            value = _ld(5, _ld(1, value))
        else:  # AnyValue.kvlist_value = 6 {values = 1 {key = 1, value = 2}}
            value = _ld(6, _ld(1, _ld(1, b"k") + _ld(2, value)))
    view = TraceView.FromString(export([span("chat", semconv_chat())]).SerializeToString())
    view.resource_spans[0].scope_spans[0].spans[0].attributes.append(_ld(1, b"gen_ai.input.messages") + _ld(2, value))
    body = view.SerializeToString()
    for _ in range(3):  # the first decode, then the caches
        assert _outcome(lambda: _handled(body)) == _outcome(lambda: _previously(body))
