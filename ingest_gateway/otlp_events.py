"""OTLP protobuf trace exports -> finished contract v1 ``Event`` structs, in one pass per export.

What ``POST /otlp/v1/traces`` does with a body between reading it and publishing. The result is
what mapping each model-call span to an event object (spendstream/otel/mapping.py) and validating
those objects like posted events (``logic.validate_objects``: the ``Event`` types and limits, then
``_finish``) gives, event for event and rejection for rejection, at a fraction of the CPU:

- The body is decoded once, as a ``TraceView`` (spendstream/otel/wire.py): the request's own
  classes except that a span's attributes and status stay encoded, each distinct encoding decoded
  once by ``mapping.attribute_pairs`` / ``mapping.is_error`` (which check it as
  ``ExportTraceServiceRequest`` would). A body the view cannot read, or an attribute that cannot be
  judged alone (nested very deep), is decoded with ``ExportTraceServiceRequest``, which alone
  decides validity (400), and mapped by the reference rules (``mapping.map_export_reference``).
- A model-call span on the common route becomes the finished ``Event`` directly: the mapping
  rules of ``mapping._event`` on the typed values, then the checks the ``Event`` conversion and
  ``_finish`` would make (string lengths, token ranges and subsets, the future limit, provider and
  model normal forms, the project from the tenant's rules or ``otel.default_project``), each on
  the value as it is taken. Where the rules find each attribute is worked out once per tuple of
  attribute names (``mapping.Shape``); what the span's kind gives its event (operation, model,
  provider, agent, attribution, tags, project: checked, as an ``Event`` to copy) once per kind
  (:func:`_template`); per span remain its counts, times, ids and conversation.
- A span that one of those checks would reject, or on a less common route (client cost, a count
  sent as a double or a string, a resource attribute too long, a missing provider...), is mapped
  by ``mapping._event`` and validated by ``logic.validate_objects`` as before, so its event or its
  rejection (reason, field, message) is the one the general path gives.

tests/unit/test_otel_fast_path.py holds the two equal on a seeded corpus of every dialect, value
type and failure, and ``bench.otlp_cpu`` measures the CPU per span in process.
"""

from __future__ import annotations

import operator
from typing import Any

import msgspec
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ingest_gateway import logic
from ingest_gateway.errors import BodyError
from ingest_gateway.logic import Event, RequestContext, Validated, normalise_names, validate_objects
from spendstream.otel import mapping
from spendstream.otel.mapping import (
    ABSENT,
    MODEL_OPERATIONS,
    TAG_PREFIX,
    MappedExport,
    Shape,
    UncheckedAttribute,
    attributes,
    first_at,
    map_export_reference,
    operation_of,
    provider_id,
    shape_of,
)
from spendstream.otel.wire import OtlpDecodeError, count_spans, decode_protobuf, decode_view, hex_id
from spendstream.project_mappings import RuleSet

_event = mapping._event
_emitter = mapping._emitter
_inherited = mapping._inherited
_resource_defaults = mapping._resource_defaults
_timestamp = mapping._timestamp
_SpanError = mapping._SpanError
_PAIRS = mapping._PAIRS
_SHAPES = mapping._SHAPES
_SECONDS = mapping._SECONDS
_MAX_LATENCY_MS = mapping._MAX_LATENCY_MS
_input_excludes_cache = mapping.input_excludes_cache
_is_error = mapping.is_error
_replace = msgspec.structs.replace
_key = operator.itemgetter(0)
_span_fields = operator.attrgetter("trace_id", "span_id", "start_time_unix_nano", "end_time_unix_nano", "status")

_MAX_TOKENS = logic.MAX_TOKENS
_MAX_ID = logic.MAX_ID_LEN
_MAX_NAME = logic.MAX_MODEL_LEN
_MAX_ATTRIBUTION = logic.MAX_ATTRIBUTION_LEN
_MAX_SESSION_TYPE = logic.MAX_SESSION_TYPE_LEN
_MAX_TAGS = logic.MAX_TAGS
_MAX_TAG_KEY = logic.MAX_TAG_KEY_LEN
_MAX_TAG_VALUE = logic.MAX_TAG_VALUE_LEN
assert mapping.MAX_TOKENS_PER_EVENT == _MAX_TOKENS
# the Event's subset checks as the building loop makes them: cache read + cache write + input
# audio <= input, reasoning + output audio <= output (cache_write_1h_tokens is never mapped)
assert logic.TOKEN_PARENTS == {
    "cache_read_tokens": "input_tokens",
    "cache_write_tokens": "input_tokens",
    "cache_write_1h_tokens": "cache_write_tokens",
    "reasoning_tokens": "output_tokens",
    "input_audio_tokens": "input_tokens",
    "output_audio_tokens": "output_tokens",
}
assert mapping._COUNT_FIELDS == (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
)

#: a call span the mapping rejected (its reason is in ``MappedExport.rejected``)
_REJECTED = object()


class _Resource:
    """What one resource gives its spans (``mapping._resource_defaults``), and whether all of it
    passes the ``Event`` limits (else its spans take the general route). One object per distinct
    content (:func:`_resource`), so that templates keyed by it serve later exports too."""

    __slots__ = ("defaults", "project", "agent", "user", "session_id", "label", "kind", "tags", "ok")

    def __init__(self, defaults: dict[str, Any]):
        self.defaults = d = defaults
        self.project, self.agent, self.user = d["project"], d["agent"], d["user"]
        self.session_id, self.label, self.kind = d["session_id"], d["session_label"], d["session_type"]
        tags: dict[str, str] = d["tags"]
        self.tags = tags or None
        self.ok = (
            _fits(self.project, _MAX_ID)
            and _fits(self.agent, _MAX_ID)
            and _fits(self.user, _MAX_ATTRIBUTION)
            and _fits(self.session_id, _MAX_ATTRIBUTION)
            and _fits(self.label, _MAX_ATTRIBUTION)
            and _fits(self.kind, _MAX_SESSION_TYPE)
            and len(tags) <= _MAX_TAGS
            and all(len(k) <= _MAX_TAG_KEY and len(v) <= _MAX_TAG_VALUE for k, v in tags.items())
        )


#: the resource's defaults (as a hashable tuple) -> its _Resource (bounded: emptied when full)
_RESOURCES: dict[tuple[Any, ...], _Resource] = {}


def _resource(resource: dict[str, Any]) -> _Resource:
    defaults = _resource_defaults(resource)
    key = tuple(v if k != "tags" else tuple(v.items()) for k, v in defaults.items())
    base = _RESOURCES.get(key)
    if base is None:
        if len(_RESOURCES) >= 1024:
            _RESOURCES.clear()
        base = _RESOURCES[key] = _Resource(defaults)
    return base


def _fits(value: str | None, limit: int) -> bool:
    return value is None or len(value) <= limit


class _Request:
    """What every span of one export shares."""

    __slots__ = ("client_cost", "ctx", "latest_ms", "rules", "default_project", "rejections")

    def __init__(self, client_cost: bool, ctx: RequestContext, rules: RuleSet, default_project: str):
        self.client_cost = client_cost
        self.ctx = ctx
        #: the latest event time accepted, ms (``_finish`` compares the canonical strings: the same)
        self.latest_ms = ctx.received_ms + logic._MAX_FUTURE_MS
        self.rules = rules
        self.default_project = default_project
        #: (span ref, reason) of the mapping's rejections, in export order
        self.rejections: list[tuple[str, str]] = []

    def project_for(self, agent: str, session_label: str | None) -> str:
        """The project of a span without one: the tenant's mapping rules, else ``otel.default_project``."""
        return self.rules.project_for(agent, session_label) or self.default_project


def map_and_validate(
    body: bytes,
    *,
    client_cost: bool,
    max_spans: int,
    rules: RuleSet,
    default_project: str,
    ctx: RequestContext,
    request: ExportTraceServiceRequest | None = None,
) -> tuple[MappedExport, Validated]:
    """The model-call spans of a protobuf ``ExportTraceServiceRequest`` as validated events (module
    doc). ``MappedExport`` counts the spans and lists the mapping's rejections (its ``events`` stay
    empty); ``Validated`` holds the events by project and the validation's rejections.
    ``OtlpDecodeError`` for a malformed body, ``BodyError`` 413 for more than ``max_spans`` spans.
    ``request``: ``body`` decoded already (OTLP JSON, ``body`` its encoding), for the general route."""
    req = _Request(client_cost, ctx, rules, default_project)
    try:
        view = decode_view(body)
    except DecodeError:
        return _general(body, req, max_spans, request)
    if count_spans(view) > max_spans:
        return _general(body, req, max_spans, request)
    try:
        return _map(view, req)
    except UncheckedAttribute:
        return _general(body, req, max_spans, request)


def _general(
    body: bytes, req: _Request, max_spans: int, request: ExportTraceServiceRequest | None
) -> tuple[MappedExport, Validated]:
    """The request decoded whole (400 when it is not valid) and mapped by the reference rules."""
    if request is None:
        request = decode_protobuf(body)
    spans = count_spans(request)
    if spans > max_spans:
        raise BodyError(
            413, "too_many_spans", f"{spans} spans in one export, more than {max_spans}: export smaller batches"
        )
    mapped = map_export_reference(request, client_cost=req.client_cost)
    for ev in mapped.events:
        _project_of_object(ev, req)
    result = validate_objects(mapped.events, req.ctx)
    mapped.events.clear()
    return mapped, result


def _project_of_object(ev: dict[str, Any], req: _Request) -> None:
    if "project" not in ev:
        ev["project"] = req.project_for(ev.get("agent", "default"), ev.get("session_label"))


class _General(Exception):
    """This span takes the general route (raised inside the building loop; rare)."""


def _map(view: Any, req: _Request) -> tuple[MappedExport, Validated]:
    out = MappedExport()
    pair_of = _PAIRS.__getitem__
    shape_for = _SHAPES.get
    # (span, its agent name, its conversation id) of every span, for inheritance
    seen: list[tuple[Any, str | None, str | None]] = []
    # (span, pairs, shape, operation, agent, conversation, resource, emitter) of each model call
    calls: list[tuple[Any, list[Any], Shape, Any, Any, Any, _Resource, str]] = []
    inherit = False
    for resource_spans in view.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        base = _resource(resource)
        for scope_spans in resource_spans.scope_spans:
            emitter = _emitter(resource, scope_spans.scope.name)
            for span in scope_spans.spans:
                raws = span.attributes[:]  # (a list at once: cheaper than iterating the container)
                pairs = list(map(pair_of, raws))  # (decoding the encodings not seen yet)
                names = tuple(map(_key, pairs))
                pairs.append(ABSENT)  # index -1: an attribute the span does not have
                shape = shape_for(names) or shape_of(names)
                agent = pairs[shape.agent][1]
                if agent is not None and (type(agent) is not str or not agent.strip()):
                    agent = None  # as _first(attrs, _AGENT)
                conversation = pairs[shape.session][1]
                if type(conversation) is not str or not conversation.strip():
                    conversation = first_at(pairs, shape.sessions[1:]) if len(shape.sessions) > 1 else None
                seen.append((span, agent, conversation))
                op = pairs[shape.op][1]
                if type(op) is str and op:  # the common case of operation_of
                    if op not in MODEL_OPERATIONS:
                        continue
                elif shape.other_call:
                    op, is_call = operation_of(_attrs(pairs))
                    if not is_call:
                        continue
                else:
                    continue
                if agent is None or conversation is None:
                    inherit = True
                calls.append((span, pairs, shape, op, agent, conversation, base, emitter))
    out.spans = len(seen)
    out.ignored = len(seen) - len(calls)
    index = {(s.trace_id, s.span_id): (s.parent_span_id, a, c) for s, a, c in seen} if inherit else None

    # each call span's finished Event (the rules of mapping._event, then the project rule, the
    # Event conversion and logic._finish, as checks on the values as they are taken; what depends
    # only on the span's kind comes from its template), else the general route's answer: each
    # `raise _General` is a place where those would take another turn
    by_project: dict[str, list[Event]] = {}
    event_ids: list[str] = []
    rejected: list[dict[str, Any]] = []  # by the validation, numbered among the mapped events
    group_of = by_project.get
    template_of = _TEMPLATES.get
    seconds_text = _SECONDS.get
    millis_text = _MILLIS
    replace = _replace
    client_cost = req.client_cost
    rules = req.rules
    default_project = req.default_project
    latest_ms = req.latest_ms
    for span, pairs, shape, op, agent, conversation, base, emitter in calls:
        if index is not None:
            agent = agent or _inherited(span, index, 1)
            conversation = conversation or _inherited(span, index, 2)
        try:
            if client_cost and pairs[shape.cost][1] is not None:
                raise _General
            key = (shape, base, emitter, op, agent, rules, default_project, shape.categorical(pairs))
            template = template_of(key, _MISSING)
            if template is _MISSING:
                template = _template(key, pairs, shape, op, agent, base, emitter, req)
            if template is None:
                raise _General
            excludes, proto = template
            trace_id, span_id, start_ns, end_ns, status = _span_fields(span)
            if len(trace_id) != 16 or len(span_id) != 8:
                raise _General
            if session_id := conversation or base.session_id:
                if len(session_id) > _MAX_ATTRIBUTION:
                    raise _General

            # input, output, cache read, cache write, reasoning, input audio, output audio
            counts = [0, 0, 0, 0, 0, 0, 0]
            for at, position in shape.counts:
                value = pairs[at][1]
                if type(value) is not int or value < 0 or value > _MAX_TOKENS:
                    raise _General  # a later name, a double, a digit string or a rejection: _event reads it
                counts[position] = value
            input_tokens, output_tokens, cache_read, cache_write, reasoning, input_audio, output_audio = counts
            if (cache := cache_read + cache_write) and (excludes or cache > input_tokens):
                input_tokens += cache
            if (
                input_tokens > _MAX_TOKENS
                or cache + input_audio > input_tokens
                or reasoning + output_audio > output_tokens
            ):
                raise _General

            if at_ns := end_ns or start_ns:
                at_ms = at_ns // 1_000_000
                if at_ms > latest_ms:
                    raise _General
                seconds, millis = divmod(at_ms, 1000)
                prefix = seconds_text(seconds)
                timestamp = _timestamp(at_ns) if prefix is None else prefix + millis_text[millis]
            else:
                timestamp = req.ctx.received_at_str

            ev = replace(
                proto,
                event_id=f"otel-{trace_id.hex()}-{span_id.hex()}",
                timestamp=timestamp,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                reasoning_tokens=reasoning,
            )
            if start_ns and end_ns >= start_ns:
                latency = (end_ns - start_ns) // 1_000_000
                ev.latency_ms = latency if latency < _MAX_LATENCY_MS else _MAX_LATENCY_MS
            if session_id:
                ev.session_id = session_id
            if status and _is_error(status):
                ev.status = "error"
            if input_audio:
                ev.input_audio_tokens = input_audio
            if output_audio:
                ev.output_audio_tokens = output_audio
        except _General:
            ev = _general_span(span, pairs, op, agent, conversation, base, emitter, req)
            if ev is _REJECTED:
                continue
            _project_of_object(ev, req)  # and validated as before
            one = validate_objects([ev], req.ctx)
            if one.rejected:
                (r,) = one.rejected
                r["index"] = len(event_ids) + len(rejected)
                rejected.append(r)
                continue
            ((ev,),) = one.by_project.values()
        event_ids.append(ev.event_id)
        group = group_of(ev.project)
        if group is None:
            by_project[ev.project] = [ev]
        else:
            group.append(ev)
    out.rejected = req.rejections
    return out, Validated(by_project, event_ids, rejected)


def _attrs(pairs: list[Any]) -> dict[str, Any]:
    """The ``{name: value}`` the rules of spendstream/otel/mapping.py read (``ABSENT`` left out)."""
    attrs = dict(pairs)
    attrs.pop(None, None)
    return attrs


def _general_span(
    span: Any,
    pairs: list[Any],
    op: str | None,
    agent: str | None,
    conversation: str | None,
    base: _Resource,
    emitter: str,
    req: _Request,
) -> Any:
    """The span's event object by ``mapping._event`` (to be validated), or _REJECTED with its
    reason noted."""
    attrs = _attrs(pairs)
    tags = {name: value for name, value in attrs.items() if name.startswith(TAG_PREFIX)} or None
    try:
        return _event(span, attrs, tags, op, agent, conversation, base.defaults, emitter, req.client_cost)
    except _SpanError as exc:
        req.rejections.append((f"{hex_id(span.trace_id)}/{hex_id(span.span_id)}", str(exc)))
        return _REJECTED


#: what a kind of span gives its event besides its counts, times, ids and conversation:
#: (shape, resource, emitter, operation, agent, rules, default project, the categorical pairs)
#: -> _Template, or None when the Event checks would turn it down (bounded: emptied when full)
_TEMPLATES: dict[tuple[Any, ...], tuple[Any, ...] | None] = {}
_MISSING = object()
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _template(
    key: tuple[Any, ...],
    pairs: list[Any],
    shape: Shape,
    op: str | None,
    agent: str | None,
    base: _Resource,
    emitter: str,
    req: _Request,
) -> tuple[Any, ...] | None:
    """(cache parts are to be added to the input, the finished event's fields that depend only on
    the span's kind: project, agent, provider, model, operation, user, session label and type,
    tags, as an ``Event`` to copy), as ``mapping._event``, the project rule, the Event conversion
    and ``_finish`` would make them; None where they would turn it down."""
    template = _template_of(pairs, shape, op, agent, base, emitter, req)
    if len(_TEMPLATES) >= 4096:
        _TEMPLATES.clear()
    _TEMPLATES[key] = template
    return template


def _template_of(
    pairs: list[Any], shape: Shape, op: str | None, agent: str | None, base: _Resource, emitter: str, req: _Request
) -> tuple[Any, ...] | None:
    if not base.ok or (op and len(op) > _MAX_ATTRIBUTION):
        return None
    model = first_at(pairs, shape.models)
    if model is None:
        return None
    name = first_at(pairs, shape.providers)
    provider = provider_id(name) if name else None
    if len(model) > _MAX_NAME or (provider and len(provider) > _MAX_NAME):
        return None
    canonical_provider, canonical_model = normalise_names(provider or None, model)
    if not canonical_provider or not canonical_model:
        return None
    if shape.attribution is not None:
        projects, users, labels, kinds = shape.attribution
        project = first_at(pairs, projects) or base.project
        user = first_at(pairs, users) or base.user
        label = first_at(pairs, labels) or base.label
        kind = first_at(pairs, kinds) or base.kind
        if not (
            _fits(project, _MAX_ID)
            and _fits(user, _MAX_ATTRIBUTION)
            and _fits(label, _MAX_ATTRIBUTION)
            and _fits(kind, _MAX_SESSION_TYPE)
        ):
            return None
    else:
        project, user, label, kind = base.project, base.user, base.label, base.kind
    agent = agent or base.agent or "default"
    if len(agent) > _MAX_ID:
        return None
    if project is None:
        project = req.project_for(agent, label)
        if not project or len(project) > _MAX_ID or project.isspace():
            return None
    tags = base.tags
    if shape.tags:
        tags = dict(tags) if tags else {}
        for at, key in shape.tags:
            value = pairs[at][1]
            if value is not None:
                value = str(value)
                if len(value) > _MAX_TAG_VALUE or len(key) > _MAX_TAG_KEY:
                    return None
                tags[key] = value
        if len(tags) > _MAX_TAGS:
            return None
    excludes = _input_excludes_cache(provider, emitter)
    proto = Event(project=project, agent=agent, provider=canonical_provider, model=canonical_model, status="ok")
    for name, value in (("operation", op), ("user", user), ("session_label", label), ("session_type", kind)):
        if value:
            setattr(proto, name, value)
    if tags:
        proto.tags = tags
    return excludes, proto


__all__ = ["OtlpDecodeError", "map_and_validate"]
