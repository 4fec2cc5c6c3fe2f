"""Decoded OTLP spans -> contract v1 usage events, per the OpenTelemetry GenAI semantic conventions.

Only model calls cost money, and each costs once:

- A span is a model call when ``gen_ai.operation.name`` is one of :data:`MODEL_OPERATIONS`
  (``chat``, ``text_completion``, ``generate_content``, ``embeddings``); agent, tool and workflow
  spans (``invoke_agent``, ``execute_tool``, ...) never are, even when they carry the summed usage
  of their children. Without that attribute: OpenLLMetry's older ``llm.request.type``, the Vercel
  AI SDK's ``ai.operationId`` (only the inner ``*.doGenerate`` / ``*.doStream`` / ``*.doEmbed``
  provider calls, not the outer ``ai.generateText`` that repeats their usage) and OpenInference's
  ``openinference.span.kind`` (``LLM``, ``EMBEDDING``) decide.
- Token counts: the first attribute present of each list in :data:`TOKEN_ATTRIBUTES` (current
  semconv names first, then the deprecated ones and the emitters' dialects).
- ``input_tokens`` includes cache reads and writes (semconv and contract v1). Emitters known to
  report Anthropic's uncached count instead (:func:`input_excludes_cache`: OpenLIT) and any span
  whose cache parts exceed its input (an inclusive count never can) get the cache added, once.
- The event id is ``otel-<trace id>-<span id>`` (hex), so a re-exported span is the same event and
  the pricing stage drops the copy; the timestamp is the span's end, ``latency_ms`` its duration,
  ``status`` ``error`` when the span status is ERROR.
- Attribution: ``project`` from ``spendstream.project`` (span, else resource; absent: the gateway's
  mapping rules decide); ``agent`` from ``gen_ai.agent.name`` (the span's, else the nearest
  ``invoke_agent`` ancestor's in the same export), else resource ``service.name``; ``user`` from
  ``user.id`` / ``enduser.id``; ``session_id`` from ``gen_ai.conversation.id`` / ``session.id``
  (also inherited from an ancestor); ``session_label`` / ``session_type`` from
  ``spendstream.session.label`` / ``spendstream.session.type``; tags from ``spendstream.tag.<key>``.
- ``gen_ai.usage.cost`` (OpenLIT's estimate; semconv has no cost attribute) becomes the event's
  client price only when the caller opts in (``client_cost``); by default Spendstream prices it.

What cannot be an event (a model call without a model, a token count that is not a count, no span
id) is rejected with its reason; the gateway counts those in the OTLP partial-success answer.
Field limits and token consistency are checked afterwards by the gateway's event validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from spendstream.money import MAX_TOKENS_PER_EVENT
from spendstream.otel.wire import hex_id
from spendstream.timeutil import format_epoch_ms

#: ``gen_ai.operation.name`` values of a model call (semconv), plus the legacy spellings
MODEL_OPERATIONS = frozenset(("chat", "text_completion", "generate_content", "embeddings", "completion"))
#: OpenLLMetry's pre-semconv ``llm.request.type`` -> operation
_LEGACY_REQUEST_TYPES = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings"}
#: Vercel AI SDK ``ai.operationId`` suffixes of the provider call (the outer span repeats its usage)
_VERCEL_CALL_SUFFIXES = (".doGenerate", ".doStream", ".doEmbed")
_OPENINFERENCE_KINDS = {"LLM": "chat", "EMBEDDING": "embeddings"}
#: OpenLLMetry span kinds that are never a model call
_TRACELOOP_NON_CALLS = frozenset(("workflow", "task", "agent", "tool"))

TOKEN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "input_tokens": (
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.prompt_tokens",  # deprecated (semconv < 1.27)
        "llm.token_count.prompt",  # OpenInference
        "ai.usage.inputTokens",  # Vercel AI SDK 5+
        "ai.usage.promptTokens",  # Vercel AI SDK 4
    ),
    "output_tokens": (
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
        "llm.token_count.completion",
        "ai.usage.outputTokens",
        "ai.usage.completionTokens",
    ),
    "cache_read_tokens": (
        "gen_ai.usage.cache_read.input_tokens",  # semconv 1.40
        "gen_ai.usage.cache_read_input_tokens",  # OpenLLMetry
        "gen_ai.usage.details.cache_read_tokens",  # pydantic-ai
        "gen_ai.usage.input_tokens.cached",  # Sentry
        "llm.token_count.prompt_details.cache_read",  # OpenInference
        "ai.usage.cachedInputTokens",  # Vercel AI SDK
    ),
    "cache_write_tokens": (
        "gen_ai.usage.cache_creation.input_tokens",  # semconv 1.40
        "gen_ai.usage.cache_write.input_tokens",  # its new name
        "gen_ai.usage.cache_creation_input_tokens",  # OpenLLMetry
        "gen_ai.usage.details.cache_write_tokens",  # pydantic-ai
        "gen_ai.usage.input_tokens.cache_write",  # Sentry
        "llm.token_count.prompt_details.cache_write",  # OpenInference
    ),
    "reasoning_tokens": (
        "gen_ai.usage.reasoning.output_tokens",  # semconv 1.41
        "gen_ai.usage.reasoning_tokens",  # OpenLLMetry
        "gen_ai.usage.output_tokens.reasoning",  # Sentry
        "gen_ai.usage.details.reasoning_tokens",  # pydantic-ai
        "llm.token_count.completion_details.reasoning",  # OpenInference
        "ai.usage.reasoningTokens",  # Vercel AI SDK
    ),
    "input_audio_tokens": ("llm.token_count.prompt_details.audio",),
    "output_audio_tokens": ("llm.token_count.completion_details.audio",),
}
_USAGE_NAMES = frozenset(name for names in TOKEN_ATTRIBUTES.values() for name in names)

_PROVIDER_ATTRIBUTES = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system", "ai.model.provider")
_MODEL_ATTRIBUTES = (
    "gen_ai.response.model",
    "ai.response.model",  # the response's model first: a dated snapshot prices exactly
    "gen_ai.request.model",
    "llm.model_name",
    "ai.model.id",
)
#: semconv ``gen_ai.provider.name`` values (and other emitters' names) -> genai-prices provider ids;
#: names not listed go to the pricing stage as they are (its catalog matches aliases)
PROVIDER_IDS = {
    "aws.bedrock": "aws",
    "amazon-bedrock": "aws",
    "bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.openai": "azure",
    "az.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "vertex_ai": "google",
    "gemini": "google",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
    "xai": "x-ai",
}

MAX_ANCESTORS = 32
MAX_TAGS = 32
TAG_PREFIX = "spendstream.tag."


@dataclass
class MappedExport:
    """The events of one export request, and what was left out."""

    events: list[dict[str, Any]] = field(default_factory=list)
    #: model-call spans that could not become events: (span ref "trace/span", reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    spans: int = 0
    #: spans that are not model calls (agents, tools, HTTP...): no cost, not an error
    ignored: int = 0


class _SpanError(ValueError):
    pass


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "string_value":
        return any_value.string_value
    if kind == "int_value":
        return any_value.int_value
    if kind == "double_value":
        return any_value.double_value
    if kind == "bool_value":
        return any_value.bool_value
    return None  # arrays, maps and bytes carry nothing the mapping reads


def attributes(key_values: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` list -> {key: scalar value} (non-scalar values left out)."""
    return {kv.key: _value(kv.value) for kv in key_values}


def _count(attrs: dict[str, Any], names: tuple[str, ...]) -> int:
    for name in names:
        value = attrs.get(name)
        if value is None:
            continue
        if type(value) is float and value.is_integer():
            value = int(value)
        elif type(value) is str and value.strip().isdigit():
            value = int(value.strip()[:12])
        if type(value) is not int or value < 0 or value > MAX_TOKENS_PER_EVENT:
            raise _SpanError(f"{name} must be an integer from 0 to {MAX_TOKENS_PER_EVENT}, got {str(value)[:40]!r}")
        return value
    return 0


def _first(attrs: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = attrs.get(name)
        if type(value) is str and value.strip():
            return value
    return None


def operation_of(attrs: dict[str, Any]) -> tuple[str | None, bool]:
    """``(operation, is a model call)`` of a span's attributes."""
    op = attrs.get("gen_ai.operation.name")
    if type(op) is str and op:
        return op, op in MODEL_OPERATIONS
    vercel = attrs.get("ai.operationId")
    if type(vercel) is str and vercel:
        return vercel, vercel.endswith(_VERCEL_CALL_SUFFIXES)
    kind = attrs.get("openinference.span.kind")
    if type(kind) is str and kind:
        return _OPENINFERENCE_KINDS.get(kind.upper(), kind.lower()), kind.upper() in _OPENINFERENCE_KINDS
    if attrs.get("traceloop.span.kind") in _TRACELOOP_NON_CALLS:
        return None, False
    legacy = attrs.get("llm.request.type")
    if type(legacy) is str and legacy in _LEGACY_REQUEST_TYPES:
        return _LEGACY_REQUEST_TYPES[legacy], True
    # an older instrumentation without any of the above: a model and a usage count make a call
    has_model = _first(attrs, _MODEL_ATTRIBUTES) is not None
    return None, has_model and not _USAGE_NAMES.isdisjoint(attrs)


def provider_id(name: str) -> str:
    key = name.strip().lower()
    if key in PROVIDER_IDS:
        return PROVIDER_IDS[key]
    if "." in key:  # Vercel "openai.chat", "anthropic.messages", "google.generative-ai"
        head = key.split(".", 1)[0]
        return PROVIDER_IDS.get(head, head)
    return key


def input_excludes_cache(provider: str | None, emitter: str) -> bool:
    """Emitters that report Anthropic's uncached ``input_tokens`` as ``gen_ai.usage.input_tokens``
    (WIRE-CONTRACTS.md section 2): OpenLIT."""
    return provider == "anthropic" and emitter == "openlit"


def _emitter(resource: dict[str, Any], scope_name: str) -> str:
    if resource.get("telemetry.sdk.name") == "openlit" or scope_name.startswith("openlit"):
        return "openlit"
    return ""


def _client_cost(value: Any) -> str | None:
    """``gen_ai.usage.cost`` (a double, USD) -> a decimal string rounded to the nano-USD."""
    if type(value) is str:
        try:
            value = Decimal(value[:40])
        except InvalidOperation:
            raise _SpanError(f"gen_ai.usage.cost is not a number: {value[:40]!r}") from None
    elif type(value) in (int, float):
        if type(value) is float and not math.isfinite(value):
            raise _SpanError("gen_ai.usage.cost must be finite")
        value = Decimal(repr(value))
    else:
        return None
    if not value.is_finite():
        raise _SpanError("gen_ai.usage.cost must be finite")
    return str(value.quantize(Decimal("1e-9"), ROUND_HALF_EVEN))


def _resource_defaults(resource: dict[str, Any]) -> dict[str, Any]:
    """What a resource gives every span of it when the span does not say (computed once per resource)."""
    out: dict[str, Any] = {
        "project": _first(resource, ("spendstream.project",)),
        "agent": _first(resource, ("service.name",)),
        "user": _first(resource, ("user.id", "enduser.id")),
        "session_id": _first(resource, ("gen_ai.conversation.id", "session.id")),
        "session_label": _first(resource, ("spendstream.session.label",)),
        "session_type": _first(resource, ("spendstream.session.type",)),
    }
    out["tags"] = {
        k[len(TAG_PREFIX) :]: str(v) for k, v in resource.items() if k.startswith(TAG_PREFIX) and v is not None
    }
    return out


def map_export(request: ExportTraceServiceRequest, *, client_cost: bool = False) -> MappedExport:
    """Every model-call span of ``request`` as a contract v1 event object (see the module doc)."""
    out = MappedExport()
    # (trace id, span id) -> (parent span id, agent name, conversation id), for inheritance
    index: dict[tuple[bytes, bytes], tuple[bytes, str | None, str | None]] = {}
    calls: list[tuple[Any, dict[str, Any], dict[str, Any], str]] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        defaults = _resource_defaults(resource)
        for scope_spans in resource_spans.scope_spans:
            emitter = _emitter(resource, scope_spans.scope.name)
            for span in scope_spans.spans:
                out.spans += 1
                attrs = attributes(span.attributes)
                agent = _first(attrs, ("gen_ai.agent.name",))
                conversation = _first(attrs, ("gen_ai.conversation.id", "session.id"))
                index[(span.trace_id, span.span_id)] = (span.parent_span_id, agent, conversation)
                op, is_call = operation_of(attrs)
                if is_call:
                    calls.append((span, attrs, defaults, emitter))
                else:
                    out.ignored += 1
    for span, attrs, defaults, emitter in calls:
        try:
            out.events.append(_event(span, attrs, defaults, emitter, index, client_cost))
        except _SpanError as exc:
            out.rejected.append((f"{hex_id(span.trace_id)}/{hex_id(span.span_id)}", str(exc)))
    return out


def _inherited(span: Any, index: dict[tuple[bytes, bytes], tuple[bytes, str | None, str | None]], slot: int) -> Any:
    """The nearest ancestor's agent name (slot 1) or conversation id (slot 2) in this export."""
    parent = span.parent_span_id
    for _ in range(MAX_ANCESTORS):
        if not parent:
            return None
        entry = index.get((span.trace_id, parent))
        if entry is None:
            return None
        if entry[slot]:
            return entry[slot]
        parent = entry[0]
    return None


def _event(
    span: Any,
    attrs: dict[str, Any],
    defaults: dict[str, Any],
    emitter: str,
    index: dict[tuple[bytes, bytes], tuple[bytes, str | None, str | None]],
    client_cost: bool,
) -> dict[str, Any]:
    if len(span.trace_id) != 16 or len(span.span_id) != 8:
        raise _SpanError("a span needs a 16-byte trace_id and an 8-byte span_id (they make its event id)")
    model = _first(attrs, _MODEL_ATTRIBUTES)
    if model is None:
        raise _SpanError("model-call span without gen_ai.response.model or gen_ai.request.model")
    provider_name = _first(attrs, _PROVIDER_ATTRIBUTES)
    provider = provider_id(provider_name) if provider_name else None
    op, _ = operation_of(attrs)

    tokens = {name: _count(attrs, names) for name, names in TOKEN_ATTRIBUTES.items()}
    cache = tokens["cache_read_tokens"] + tokens["cache_write_tokens"]
    if cache and (input_excludes_cache(provider, emitter) or cache > tokens["input_tokens"]):
        tokens["input_tokens"] += cache

    ev: dict[str, Any] = {
        "event_id": f"otel-{hex_id(span.trace_id)}-{hex_id(span.span_id)}",
        "model": model,
        "status": "error" if span.status.code == 2 else "ok",  # STATUS_CODE_ERROR
    }
    if provider:
        ev["provider"] = provider
    if op:
        ev["operation"] = op
    for name, value in tokens.items():
        if value or name in ("input_tokens", "output_tokens"):
            ev[name] = value
    end_ns = span.end_time_unix_nano or span.start_time_unix_nano
    if end_ns:
        ev["timestamp"] = format_epoch_ms(end_ns // 1_000_000)
    if span.start_time_unix_nano and span.end_time_unix_nano >= span.start_time_unix_nano:
        ev["latency_ms"] = min((span.end_time_unix_nano - span.start_time_unix_nano) // 1_000_000, 2**31 - 1)

    entry = index[(span.trace_id, span.span_id)]
    attribution = {
        "project": _first(attrs, ("spendstream.project",)),
        "agent": entry[1] or _inherited(span, index, 1),
        "user": _first(attrs, ("user.id", "enduser.id")),
        "session_id": entry[2] or _inherited(span, index, 2),
        "session_label": _first(attrs, ("spendstream.session.label",)),
        "session_type": _first(attrs, ("spendstream.session.type",)),
    }
    for name, value in attribution.items():
        if value := value or defaults[name]:
            ev[name] = value
    tags = defaults["tags"]
    span_tags = [(k[len(TAG_PREFIX) :], str(v)) for k, v in attrs.items() if k.startswith(TAG_PREFIX) and v is not None]
    if span_tags:
        tags = {**tags, **dict(span_tags)}
    if tags:
        ev["tags"] = dict(tags)
    if client_cost and (cost := attrs.get("gen_ai.usage.cost")) is not None:
        if (usd := _client_cost(cost)) is not None:
            ev["cost_usd"] = usd
    return ev
