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

The attributes are read from a ``TraceView`` of the request (spendstream/otel/wire.py): each span's
attributes as their encodings, each distinct encoding decoded once (:func:`attribute_pairs`, a
bounded cache), only the values of the names in :data:`READ_ATTRIBUTES` and ``spendstream.tag.*``
converted; what depends only on which names a span has is computed once per tuple of names
(:class:`Shape`). The rules below see the same ``{name: value}`` as :func:`attributes` gives for
those names; :func:`map_export_reference` applies them to the fully decoded
``ExportTraceServiceRequest`` instead, and the unit tests hold the two equal. The gateway builds
its events straight from the same reading (ingest_gateway/otlp_events.py).

What cannot be an event (a model call without a model, a token count that is not a count, no span
id) is rejected with its reason; the gateway counts those in the OTLP partial-success answer.
Field limits and token consistency are checked afterwards by the gateway's event validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from operator import itemgetter
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from spendstream.money import MAX_TOKENS_PER_EVENT
from spendstream.otel.wire import KeyValue, Status, decode_view, hex_id
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
#: the count fields in TOKEN_ATTRIBUTES order (``Shape.counts`` names them by position)
_COUNT_FIELDS = tuple(TOKEN_ATTRIBUTES)

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

_OPERATION = "gen_ai.operation.name"
_VERCEL_OPERATION = "ai.operationId"
_OPENINFERENCE_KIND = "openinference.span.kind"
_TRACELOOP_KIND = "traceloop.span.kind"
_LEGACY_REQUEST_TYPE = "llm.request.type"
_AGENT = ("gen_ai.agent.name",)
_SESSION = ("gen_ai.conversation.id", "session.id")
_PROJECT = ("spendstream.project",)
_USER = ("user.id", "enduser.id")
_SESSION_LABEL = ("spendstream.session.label",)
_SESSION_TYPE = ("spendstream.session.type",)
_COST = "gen_ai.usage.cost"

MAX_ANCESTORS = 32
MAX_TAGS = 32
TAG_PREFIX = "spendstream.tag."
_TAG_PREFIX_LEN = len(TAG_PREFIX)
_CACHE_FIELDS = frozenset(("cache_read_tokens", "cache_write_tokens"))
_SPAN_ATTRIBUTION = frozenset((*_PROJECT, *_USER, *_SESSION_LABEL, *_SESSION_TYPE))
_MAX_LATENCY_MS = 2**31 - 1

#: every span attribute the rules read (besides ``spendstream.tag.*``); the others are never decoded
READ_ATTRIBUTES = frozenset(
    (
        _OPERATION,
        _VERCEL_OPERATION,
        _OPENINFERENCE_KIND,
        _TRACELOOP_KIND,
        _LEGACY_REQUEST_TYPE,
        _COST,
        *_USAGE_NAMES,
        *_PROVIDER_ATTRIBUTES,
        *_MODEL_ATTRIBUTES,
        *_AGENT,
        *_SESSION,
        *_PROJECT,
        *_USER,
        *_SESSION_LABEL,
        *_SESSION_TYPE,
    )
)


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


#: encoded ``KeyValue`` (one attribute of a ``TraceView`` span) -> ``(key, value)``, the value as
#: :func:`_value` gives it for the names the rules read and ``spendstream.tag.*``, None for the rest
#: (never converted), for the encodings seen at least twice. Bounded: emptied when full. A fleet
#: repeats its models, operations, agents and many counts; one-off values (response ids) stay in
#: ``_ONCE`` (encodings seen once, emptied on its own when full), so they never push out the rest.
class _PairCache(dict[bytes, tuple[str, Any]]):
    """``_PAIRS[raw]`` decodes an encoding it does not hold (:func:`_learn`), so that a span's
    pairs are one ``map`` over its encodings, hits and misses alike."""

    __slots__ = ()

    def __missing__(self, raw: bytes) -> tuple[str, Any]:
        return _learn(raw)


_PAIRS = _PairCache()
_ONCE: dict[bytes, tuple[str, Any]] = {}
PAIR_CACHE_SIZE = 16_384
#: longer encodings are decoded every time (a read attribute that long is rare: names and ids)
PAIR_CACHE_BYTES = 256
#: an attribute encoding up to this long cannot nest deeper than protobuf's limit inside a request
#: (each level of nesting takes at least 2 bytes: 128 bytes are at most 64 levels, under 100 - 5)
_SHALLOW_BYTES = 128
#: array/kvlist values nested deeper than this (each level up to 3 message levels) are left to
#: ``ExportTraceServiceRequest`` to judge (:class:`UncheckedAttribute`)
MAX_VALUE_NESTING = 20
_NESTED_KINDS = frozenset(("array_value", "kvlist_value"))


class UncheckedAttribute(ValueError):
    """A span attribute that decoding it alone cannot vouch for: not a valid ``KeyValue``, or nested
    so deep that only the request's own decode says whether protobuf accepts it. The caller decodes
    the request with ``ExportTraceServiceRequest`` (which alone decides validity) and maps that."""


def attribute_pairs(raws: Any) -> list[tuple[str, Any]]:
    """A ``TraceView`` span's ``attributes`` (encoded ``KeyValue`` s) -> ``[(key, value)]``.

    Every encoding is decoded with ``KeyValue`` the first time it is seen, which checks it as the
    request's decode would (:class:`UncheckedAttribute` when that cannot be told alone); a cached
    encoding passed that check before."""
    return list(map(_PAIRS.__getitem__, raws))


def _learn(raw: bytes) -> tuple[str, Any]:
    pair = _ONCE.pop(raw, None)
    if pair is not None:  # seen before: it recurs, keep it
        if len(_PAIRS) >= PAIR_CACHE_SIZE:
            _PAIRS.clear()
        _PAIRS[raw] = pair
        return pair
    try:
        kv = KeyValue.FromString(raw)
    except DecodeError:
        raise UncheckedAttribute("a span attribute is not a valid KeyValue") from None
    key = kv.key
    key = _KEYS.get(key) or _key(key)  # one object per name: tuples of names then compare by identity
    value = None
    read = key in READ_ATTRIBUTES or key.startswith(TAG_PREFIX)
    if read or len(raw) > _SHALLOW_BYTES:  # (a short unread one: its key is all that is needed)
        any_value = kv.value
        kind = any_value.WhichOneof("value")
        if kind in _NESTED_KINDS and len(raw) > _SHALLOW_BYTES and _too_deep(any_value, MAX_VALUE_NESTING):
            raise UncheckedAttribute(f"span attribute {key[:64]!r} nests deeper than {MAX_VALUE_NESTING} levels")
        if read:
            value = _value(any_value)
    pair = (key, value)
    if len(raw) <= PAIR_CACHE_BYTES:
        if len(_ONCE) >= PAIR_CACHE_SIZE:
            _ONCE.clear()
        _ONCE[raw] = pair
    return pair


#: a ``TraceView`` span's encoded status -> whether it is STATUS_CODE_ERROR (a handful of
#: encodings: absent, OK, ERROR, with their messages; bounded: emptied when full)
_STATUSES: dict[bytes, bool] = {b"": False}


def is_error(status: Any) -> bool:
    """Whether a span's status (a ``Status``, or its encoding from a ``TraceView``) is ERROR."""
    if type(status) is not bytes:
        return status.code == 2  # STATUS_CODE_ERROR
    error = _STATUSES.get(status)
    if error is None:
        try:
            error = Status.FromString(status).code == 2
        except DecodeError:
            raise UncheckedAttribute("a span status is not a valid Status") from None
        if len(status) <= PAIR_CACHE_BYTES:
            if len(_STATUSES) >= 1024:
                _STATUSES.clear()
                _STATUSES[b""] = False
            _STATUSES[status] = error
    return error


#: attribute name -> the one str object the pairs use for it (bounded: emptied when full)
_KEYS: dict[str, str] = {}


def _key(key: str) -> str:
    if len(_KEYS) >= PAIR_CACHE_SIZE:
        _KEYS.clear()
    _KEYS[key] = key
    return key


def _too_deep(any_value: Any, budget: int) -> bool:
    if budget <= 0:
        return True
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return any(_too_deep(child, budget - 1) for child in any_value.array_value.values)
    if kind == "kvlist_value":
        return any(_too_deep(kv.value, budget - 1) for kv in any_value.kvlist_value.values)
    return False


#: ``attribute_pairs`` ends with this, so that index -1 of the list reads as an absent attribute
ABSENT = (None, None)


@dataclass(frozen=True, slots=True, eq=False)  # (hashed and compared by identity: one per tuple of names)
class Shape:
    """Where the rules find each attribute they read in a span's :func:`attribute_pairs` list, given
    only the names it has (whatever their values): computed once per distinct tuple of names (a
    few per emitter; bounded against crafted spans). Indexes are of the last pair of a name (the
    value that counts); -1 is the ``ABSENT`` pair at the end; tuples list the names present in
    the rules' order of preference."""

    op: int  #: ``gen_ai.operation.name``
    #: another dialect's operation attribute is present, or a model and a count (``operation_of``)
    other_call: bool
    agent: int  #: ``gen_ai.agent.name``
    session: int  #: the first of ``sessions`` (-1 when none)
    sessions: tuple[int, ...]
    models: tuple[int, ...]
    providers: tuple[int, ...]
    #: (index of the first name present of a count, the count's position in TOKEN_ATTRIBUTES)
    counts: tuple[tuple[int, int], ...]
    #: project, user, session label, session type names on the span, or None when it has none
    attribution: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None
    #: (index, tag key) of each ``spendstream.tag.*`` name, in the order the names first appear
    tags: tuple[tuple[int, str], ...]
    cost: int  #: ``gen_ai.usage.cost``
    #: the pairs whose values decide what the gateway takes from the span besides its counts,
    #: times, ids and conversation: operation, model, provider, attribution and tags
    #: (``operator.itemgetter`` of their indexes; always a tuple)
    categorical: Callable[[list[Any]], tuple[Any, ...]]


_SHAPES: dict[tuple[str, ...], Shape] = {}
_OTHER_OPERATIONS = frozenset((_VERCEL_OPERATION, _OPENINFERENCE_KIND, _TRACELOOP_KIND, _LEGACY_REQUEST_TYPE))


def shape_of(names: tuple[str, ...]) -> Shape:
    """The :class:`Shape` of a span whose pairs have these keys (``ABSENT`` not included)."""
    shape = _SHAPES.get(names)
    if shape is None:
        last = {name: i for i, name in enumerate(names)}

        def at(name: str) -> int:
            return last.get(name, -1)

        def present(candidates: tuple[str, ...]) -> tuple[int, ...]:
            return tuple(last[name] for name in candidates if name in last)

        tokens = _token_plan(frozenset(last) & _USAGE_NAMES)
        models = present(_MODEL_ATTRIBUTES)
        attribution = (present(_PROJECT), present(_USER), present(_SESSION_LABEL), present(_SESSION_TYPE))
        shape = Shape(
            op=at(_OPERATION),
            other_call=not _OTHER_OPERATIONS.isdisjoint(last) or bool(models and tokens),
            agent=at(_AGENT[0]),
            session=(present(_SESSION) or (-1,))[0],
            sessions=present(_SESSION),
            models=models,
            providers=present(_PROVIDER_ATTRIBUTES),
            counts=tuple((last[names_present[0]], _COUNT_FIELDS.index(field)) for field, names_present in tokens),
            attribution=attribution if any(attribution) else None,
            tags=tuple((last[name], name[_TAG_PREFIX_LEN:]) for name in last if name.startswith(TAG_PREFIX)),
            cost=at(_COST),
            categorical=_getter(
                (at(_OPERATION), *models, *present(_PROVIDER_ATTRIBUTES), *(i for a in attribution for i in a))
                + tuple(last[name] for name in last if name.startswith(TAG_PREFIX))
            ),
        )
        if len(_SHAPES) >= 1024:
            _SHAPES.clear()
        _SHAPES[names] = shape
    return shape


def _getter(indexes: tuple[int, ...]) -> Callable[[list[Any]], tuple[Any, ...]]:
    if len(indexes) == 1:  # itemgetter of one index gives the item itself, not a tuple of it
        (i,) = indexes
        return lambda pairs: (pairs[i],)
    return itemgetter(*indexes)


def first_at(pairs: list[tuple[Any, Any]], indexes: tuple[int, ...]) -> str | None:
    """:func:`_first` over the pairs at ``indexes``."""
    for i in indexes:
        value = pairs[i][1]
        if type(value) is str and value.strip():
            return value
    return None


def read_attributes(span: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A ``TraceView`` span's attributes (the values of the names the rules do not read are None)
    and its ``spendstream.tag.*`` ones, with the values :func:`attributes` gives them."""
    attrs = dict(attribute_pairs(span.attributes))
    tags = {name: value for name, value in attrs.items() if name.startswith(TAG_PREFIX)}
    return attrs, tags or None


def _all_attributes(span: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same from a decoded ``ExportTraceServiceRequest`` span, every attribute decoded."""
    attrs = attributes(span.attributes)
    return attrs, {k: v for k, v in attrs.items() if k.startswith(TAG_PREFIX)}


#: the usage attribute names a span has -> (event field, those of its names present, in order)
_TOKEN_PLANS: dict[frozenset[str], tuple[tuple[str, tuple[str, ...]], ...]] = {}


def _token_plan(present: frozenset[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    plan = tuple(
        (name, tuple(n for n in names if n in present))
        for name, names in TOKEN_ATTRIBUTES.items()
        if present & set(names)
    )
    if len(_TOKEN_PLANS) >= 1024:  # a few shapes per emitter; bounded against crafted spans
        _TOKEN_PLANS.clear()
    _TOKEN_PLANS[present] = plan
    return plan


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
    op = attrs.get(_OPERATION)
    if type(op) is str and op:
        return op, op in MODEL_OPERATIONS
    vercel = attrs.get(_VERCEL_OPERATION)
    if type(vercel) is str and vercel:
        return vercel, vercel.endswith(_VERCEL_CALL_SUFFIXES)
    kind = attrs.get(_OPENINFERENCE_KIND)
    if type(kind) is str and kind:
        return _OPENINFERENCE_KINDS.get(kind.upper(), kind.lower()), kind.upper() in _OPENINFERENCE_KINDS
    if attrs.get(_TRACELOOP_KIND) in _TRACELOOP_NON_CALLS:
        return None, False
    legacy = attrs.get(_LEGACY_REQUEST_TYPE)
    if type(legacy) is str and legacy in _LEGACY_REQUEST_TYPES:
        return _LEGACY_REQUEST_TYPES[legacy], True
    # an older instrumentation without any of the above: a model and a usage count make a call
    has_model = _first(attrs, _MODEL_ATTRIBUTES) is not None
    return None, has_model and not _USAGE_NAMES.isdisjoint(attrs)


def provider_id(name: str) -> str:
    provider = _PROVIDER_IDS.get(name)
    if provider is None:
        if len(_PROVIDER_IDS) >= 1024:
            _PROVIDER_IDS.clear()
        provider = _PROVIDER_IDS[name] = _provider_id(name)
    return provider


#: emitted provider name -> provider id (bounded: emptied when full)
_PROVIDER_IDS: dict[str, str] = {}


def _provider_id(name: str) -> str:
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
        "project": _first(resource, _PROJECT),
        "agent": _first(resource, ("service.name",)),
        "user": _first(resource, _USER),
        "session_id": _first(resource, _SESSION),
        "session_label": _first(resource, _SESSION_LABEL),
        "session_type": _first(resource, _SESSION_TYPE),
    }
    out["tags"] = {
        k[len(TAG_PREFIX) :]: str(v) for k, v in resource.items() if k.startswith(TAG_PREFIX) and v is not None
    }
    return out


def map_export(
    request: ExportTraceServiceRequest, *, client_cost: bool = False, body: bytes | None = None
) -> MappedExport:
    """Every model-call span of ``request`` as a contract v1 event object (see the module doc).

    ``body``: the protobuf encoding ``request`` was decoded from, when the caller has it (the
    attributes are read from a ``TraceView`` of it; without it ``request`` is encoded again)."""
    view = decode_view(request.SerializeToString() if body is None else body)
    try:
        return _map(view, read_attributes, client_cost)
    except UncheckedAttribute:  # nested deeper than a lone decode can judge: ``request`` has it decoded
        return map_export_reference(request, client_cost=client_cost)


def map_export_reference(request: ExportTraceServiceRequest, *, client_cost: bool = False) -> MappedExport:
    """The same rules over every attribute of ``request`` decoded by :func:`attributes` (for the
    tests: :func:`map_export` must give the same)."""
    return _map(request, _all_attributes, client_cost)


#: (trace id, span id) -> (parent span id, agent name, conversation id), for inheritance
_Index = dict[tuple[bytes, bytes], tuple[bytes, str | None, str | None]]


_SpanAttributes = Callable[[Any], tuple[dict[str, Any], dict[str, Any] | None]]


def _map(request: Any, span_attributes: _SpanAttributes, client_cost: bool) -> MappedExport:
    out = MappedExport()
    # (span, its agent name, its conversation id) of every span, for inheritance
    seen: list[tuple[Any, str | None, str | None]] = []
    calls: list[tuple[Any, dict[str, Any], dict[str, Any] | None, str | None, Any, Any, dict[str, Any], str]] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        defaults = _resource_defaults(resource)
        for scope_spans in resource_spans.scope_spans:
            emitter = _emitter(resource, scope_spans.scope.name)
            for span in scope_spans.spans:
                attrs, tags = span_attributes(span)
                agent = attrs.get(_AGENT[0])
                if agent is not None and (type(agent) is not str or not agent.strip()):
                    agent = None  # as _first(attrs, _AGENT)
                conversation = attrs.get(_SESSION[0])
                if type(conversation) is not str or not conversation.strip():
                    conversation = _first(attrs, _SESSION)
                seen.append((span, agent, conversation))
                op = attrs.get(_OPERATION)
                if type(op) is str and op:  # the common case of operation_of
                    is_call = op in MODEL_OPERATIONS
                else:
                    op, is_call = operation_of(attrs)
                if is_call:
                    calls.append((span, attrs, tags, op, agent, conversation, defaults, emitter))
    out.spans = len(seen)
    out.ignored = len(seen) - len(calls)
    index: _Index | None = None
    for span, attrs, tags, op, agent, conversation, defaults, emitter in calls:
        if (agent is None or conversation is None) and index is None:
            index = {(s.trace_id, s.span_id): (s.parent_span_id, a, c) for s, a, c in seen}
        if index is not None:
            agent = agent or _inherited(span, index, 1)
            conversation = conversation or _inherited(span, index, 2)
        try:
            out.events.append(_event(span, attrs, tags, op, agent, conversation, defaults, emitter, client_cost))
        except _SpanError as exc:
            out.rejected.append((f"{hex_id(span.trace_id)}/{hex_id(span.span_id)}", str(exc)))
    return out


#: epoch second -> its canonical text up to the seconds (bounded: emptied when full)
_SECONDS: dict[int, str] = {}


def _timestamp(ns: int) -> str:
    """Epoch nanoseconds -> the canonical timestamp (``format_epoch_ms``), a dict hit per second."""
    seconds, millis = divmod(ns // 1_000_000, 1000)
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = format_epoch_ms(seconds * 1000)[:-5]
    return f"{prefix}.{millis:03d}Z"


def _inherited(span: Any, index: _Index, slot: int) -> Any:
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
    span_tags: dict[str, Any] | None,
    op: str | None,
    agent: str | None,
    conversation: str | None,
    defaults: dict[str, Any],
    emitter: str,
    client_cost: bool,
) -> dict[str, Any]:
    trace_id, span_id = span.trace_id, span.span_id
    if len(trace_id) != 16 or len(span_id) != 8:
        raise _SpanError("a span needs a 16-byte trace_id and an 8-byte span_id (they make its event id)")
    model = attrs.get(_MODEL_ATTRIBUTES[0])  # (the first name present: _first, inlined for it)
    if type(model) is not str or not model.strip():
        model = _first(attrs, _MODEL_ATTRIBUTES)
    if model is None:
        raise _SpanError("model-call span without gen_ai.response.model or gen_ai.request.model")
    provider_name = attrs.get(_PROVIDER_ATTRIBUTES[0])
    if type(provider_name) is not str or not provider_name.strip():
        provider_name = _first(attrs, _PROVIDER_ATTRIBUTES)
    provider = provider_id(provider_name) if provider_name else None

    ev: dict[str, Any] = {
        "event_id": f"otel-{trace_id.hex()}-{span_id.hex()}",
        "model": model,
        "status": "error" if is_error(span.status) else "ok",
    }
    if provider:
        ev["provider"] = provider
    if op:
        ev["operation"] = op

    # the counts, checked in TOKEN_ATTRIBUTES order (the first bad one names the rejection)
    present = _USAGE_NAMES.intersection(attrs)
    plan = _TOKEN_PLANS.get(present)
    if plan is None:
        plan = _token_plan(present)
    input_tokens = output_tokens = cache = 0
    for name, names in plan:
        value = attrs[names[0]]
        if type(value) is not int or value < 0 or value > MAX_TOKENS_PER_EVENT:
            value = _count(attrs, names)  # a later name, a double or digit string, or the error
        if value:
            ev[name] = value
            if name == "input_tokens":
                input_tokens = value
            elif name == "output_tokens":
                output_tokens = value
            elif name in _CACHE_FIELDS:
                cache += value
    if cache and (input_excludes_cache(provider, emitter) or cache > input_tokens):
        input_tokens += cache
    ev["input_tokens"] = input_tokens
    ev["output_tokens"] = output_tokens

    start_ns, end_ns = span.start_time_unix_nano, span.end_time_unix_nano
    if at_ns := end_ns or start_ns:
        ev["timestamp"] = _timestamp(at_ns)
    if start_ns and end_ns >= start_ns:
        latency = (end_ns - start_ns) // 1_000_000
        ev["latency_ms"] = latency if latency < _MAX_LATENCY_MS else _MAX_LATENCY_MS

    if _SPAN_ATTRIBUTION.isdisjoint(attrs):  # the common case: the resource's
        project, user, label, kind = (
            defaults["project"],
            defaults["user"],
            defaults["session_label"],
            defaults["session_type"],
        )
    else:
        project = _first(attrs, _PROJECT) or defaults["project"]
        user = _first(attrs, _USER) or defaults["user"]
        label = _first(attrs, _SESSION_LABEL) or defaults["session_label"]
        kind = _first(attrs, _SESSION_TYPE) or defaults["session_type"]
    if project:
        ev["project"] = project
    if agent := agent or defaults["agent"]:
        ev["agent"] = agent
    if user:
        ev["user"] = user
    if conversation := conversation or defaults["session_id"]:
        ev["session_id"] = conversation
    if label:
        ev["session_label"] = label
    if kind:
        ev["session_type"] = kind
    tags = defaults["tags"]
    if span_tags:
        tags = dict(tags)
        for key, value in span_tags.items():
            if value is not None:
                tags[key[_TAG_PREFIX_LEN:]] = str(value)
    if tags:
        ev["tags"] = tags if span_tags else dict(tags)
    if client_cost and (cost := attrs.get(_COST)) is not None:
        if (usd := _client_cost(cost)) is not None:
            ev["cost_usd"] = usd
    return ev
