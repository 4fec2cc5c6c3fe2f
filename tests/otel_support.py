"""Building OTLP trace exports with the opentelemetry-proto message classes, shaped as each GenAI
emitter family writes its spans (attribute names per WIRE-CONTRACTS.md section 2 and the
emitters' sources). Tests import it as ``import otel_support`` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import base64
import os
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

BASE_NS = 1_748_772_000_000_000_000  # 2025-06-01T10:00:00Z


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def key_values(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def new_trace_id() -> bytes:
    return os.urandom(16)


def new_span_id() -> bytes:
    return os.urandom(8)


def span(
    name: str,
    attrs: dict[str, Any],
    *,
    trace_id: bytes | None = None,
    span_id: bytes | None = None,
    parent: bytes = b"",
    start_ns: int = BASE_NS,
    duration_ms: int = 1500,
    error: bool = False,
) -> Span:
    return Span(
        trace_id=trace_id or new_trace_id(),
        span_id=span_id or new_span_id(),
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=start_ns + duration_ms * 1_000_000,
        attributes=key_values(attrs),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
    )


def export(
    spans: list[Span], resource: dict[str, Any] | None = None, scope: str = "opentelemetry.instrumentation.openai_v2"
) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=key_values(resource or {"service.name": "svc"})),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope), spans=spans)],
            )
        ]
    )


def merge(*requests: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    for request in requests:
        out.resource_spans.extend(request.resource_spans)
    return out


def to_otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP JSON as exporters write it: lowerCamelCase keys, hex trace/span ids, integer enums."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in data.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for s in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in s:
                        s[key] = base64.b64decode(s[key]).hex()
    return data


# ---------------------------------------------------------------- emitter families


def semconv_chat(model: str = "gpt-4o-2024-08-06", **extra: Any) -> dict[str, Any]:
    """Current semconv (OTel contrib GenAI instrumentations, semconv >= 1.37)."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": model,
        "gen_ai.response.id": "chatcmpl-123",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        **extra,
    }


def legacy_openllmetry_chat() -> dict[str, Any]:
    """Deprecated names (gen_ai.system, prompt/completion tokens, llm.request.type), as OpenLLMetry
    wrote them before semconv 1.27."""
    return {
        "llm.request.type": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.prompt_tokens": 2000,
        "gen_ai.usage.completion_tokens": 150,
        "gen_ai.usage.cache_read_input_tokens": 1024,
        "llm.usage.total_tokens": 2150,
    }
