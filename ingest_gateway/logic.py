"""Request bodies -> validated, normalised contract v1 events. Pure: no Kafka/HTTP/ClickHouse imports.

One source of truth for the event shape: the msgspec ``Event`` struct (types, lengths, ranges,
unknown fields), decoded straight from the request bytes in C, followed by ``_finish`` for what a
type cannot say (blank strings, time window, provider/model, token subsets, provider ``usage``).
A valid batch costs a few µs per event (bench/RESULTS.md); when any event fails, the body is
decoded again element by element so every rejection names its event and field.

The normalised event is the same struct, encoded with ``omit_defaults``: absent optional fields
and zero token subsets are left out of the wire format; ``agent``, ``status``, ``input_tokens``
and ``output_tokens`` are always present.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ingest_gateway.errors import BodyError
from ingest_gateway.usage import MAX_TOKENS, FieldErrors, normalise_usage
from spendstream.contracts import TOKEN_FIELDS, TOKEN_PARENTS
from spendstream.money import EVENT_COST, MAX_EVENT_COST_NANOS, MoneyError, format_usd
from spendstream.pricing.catalog import default_catalog
from spendstream.project_mappings import RuleSet as ProjectRuleSet
from spendstream.timeutil import format_epoch_ms, format_timestamp

MAX_FUTURE = timedelta(minutes=5)
_MAX_FUTURE_MS = MAX_FUTURE // timedelta(milliseconds=1)
#: the past is open (backfills are normal) down to the Unix epoch, below which no usage exists
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
MAX_ID_LEN = 128
MAX_ATTRIBUTION_LEN = 256
MAX_MODEL_LEN = 256
MAX_TAGS = 32
MAX_SESSION_TYPE_LEN = 64
MAX_TAG_KEY_LEN = 128
MAX_TAG_VALUE_LEN = 256
#: the per-event cost cap (spendstream/money.py), as the OpenAPI schema states it
MAX_COST_USD = Decimal(MAX_EVENT_COST_NANOS).scaleb(-9)
MAX_LATENCY_MS = 2**31 - 1
STATUSES = ("ok", "error")

JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/jsonlines")

_Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
_Name = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_LEN)]
_Attribution = Annotated[str, Meta(max_length=MAX_ATTRIBUTION_LEN)]
_Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
_Tags = Annotated[
    dict[Annotated[str, Meta(max_length=MAX_TAG_KEY_LEN)], Annotated[str, Meta(max_length=MAX_TAG_VALUE_LEN)]],
    Meta(max_length=MAX_TAGS),
]


class Event(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """Contract v1 event as received and, after ``_finish``, as published (see module doc)."""

    event_id: _Id | None = None
    timestamp: str | None = None
    project: _Id | None = None  # required unless a project mapping rule matches (see _finish)
    agent: _Id | None = None
    user: _Attribution | None = None
    session_id: _Attribution | None = None
    session_label: _Attribution | None = None
    session_type: Annotated[str, Meta(max_length=MAX_SESSION_TYPE_LEN)] | None = None
    operation: _Attribution | None = None
    tags: _Tags | None = None
    provider: _Name | None = None
    model: _Name
    input_tokens: _Tokens | None = None
    output_tokens: _Tokens | None = None
    cache_read_tokens: _Tokens = 0
    cache_write_tokens: _Tokens = 0
    cache_write_1h_tokens: _Tokens = 0
    reasoning_tokens: _Tokens = 0
    input_audio_tokens: _Tokens = 0
    output_audio_tokens: _Tokens = 0
    usage: dict[str, Any] | None = None
    cost_usd: str | float | int | None = None
    latency_ms: Annotated[int, Meta(ge=0, le=MAX_LATENCY_MS)] | None = None
    status: Literal["ok", "error"] | None = None


EVENT_FIELDS: frozenset[str] = frozenset(Event.__struct_fields__)
assert EVENT_FIELDS >= set(TOKEN_FIELDS), "Event must carry every contract token field"

_decode_list = msgspec.json.Decoder(list[Event]).decode
_decode_one = msgspec.json.Decoder(Event).decode
_decode_raw_list = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_any = msgspec.json.Decoder().decode
encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------- body


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_media_type(content_type: str | None) -> bool:
    """True for NDJSON, False for JSON; BodyError(415) for anything else."""
    mt = media_type(content_type)
    if mt in JSON_TYPES:
        return False
    if mt in NDJSON_TYPES:
        return True
    raise BodyError(
        415,
        "unsupported_media_type",
        f"Content-Type {mt or '(none)'!r} is not supported: send application/json "
        "(one event or an array) or application/x-ndjson (one event per line)",
    )


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding: gzip``, refusing to inflate past ``max_bytes`` (zip bombs).

    Every member of the body is decoded, in order: RFC 1952 lets a gzip stream hold several (what
    ``cat a.gz b.gz``, pigz and many streaming compressors send), and a body is the concatenation of
    their contents. Bytes after a member that do not form another whole member are an error.
    """
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return body
    if enc not in ("gzip", "x-gzip"):
        message = f"Content-Encoding {enc!r} is not supported: use gzip"
        raise BodyError(415, "unsupported_content_encoding", message, "content-encoding")
    out = bytearray()
    inflater = zlib.decompressobj(_GZIP_WBITS)
    started = False  # the current member has been given bytes
    view = memoryview(body)
    try:
        # fed a piece at a time: zlib copies the input left after a member into unused_data, so
        # feeding all of it would cost quadratic time on a body of many tiny members
        for at in range(0, len(body), _GUNZIP_PIECE):
            data: bytes | memoryview = view[at : at + _GUNZIP_PIECE]
            while data:
                started = True
                out += inflater.decompress(data, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise BodyError(413, "body_too_large", f"decompressed body exceeds {max_bytes} bytes")
                if not inflater.eof:
                    break  # the whole piece went in (output stayed below its cap): the member goes on
                data = inflater.unused_data
                inflater = zlib.decompressobj(_GZIP_WBITS)
                started = False
    except zlib.error as exc:
        raise BodyError(400, "bad_gzip", f"request body is not valid gzip: {exc}") from None
    if started or not body:
        raise BodyError(400, "bad_gzip", "request body is truncated gzip")
    return bytes(out)


_GZIP_WBITS = 16 + zlib.MAX_WBITS
#: input bytes per decompress call (small enough that a member's leftover copy stays cheap)
_GUNZIP_PIECE = 4096


_BYTE_POS = re.compile(r"\(byte (\d+)\)")


def _malformed(exc: msgspec.DecodeError, doc: bytes, line_offset: int = 0) -> BodyError:
    m = _BYTE_POS.search(str(exc))
    pos = int(m.group(1)) if m else len(doc)
    line = doc.count(b"\n", 0, pos) + 1
    column = pos - (doc.rfind(b"\n", 0, pos) + 1) + 1
    reason = str(exc).replace("JSON is malformed: ", "")
    reason = _BYTE_POS.sub("", reason).strip()
    return BodyError(400, "malformed_json", f"malformed JSON at line {line + line_offset}, column {column}: {reason}")


def _too_many(max_events: int) -> BodyError:
    return BodyError(413, "too_many_events", f"more than {max_events} events in one request")


_WHITESPACE = re.compile(rb"[ \t\r\n]*")


def _first_byte(body: bytes) -> bytes:
    """The first non-whitespace byte (b"" for a blank body), without copying the body."""
    start = _WHITESPACE.match(body).end()  # type: ignore[union-attr]  # matches the empty string at least
    return body[start : start + 1]


def _json_items(body: bytes, max_events: int) -> tuple[list[Event] | None, list[msgspec.Raw]]:
    """(typed events, []) when the whole body is valid, else (None, the raw elements)."""
    start = _first_byte(body)
    try:
        if start == b"[":
            events = _decode_list(body)
            if len(events) > max_events:
                raise _too_many(max_events)
            return events, []
        if start == b"{":
            return [_decode_one(body)], []
    except msgspec.ValidationError:  # (a DecodeError subclass, so caught first)
        pass  # some event is invalid: the slow path below finds which
    except msgspec.DecodeError as exc:
        raise _malformed(exc, body) from None
    try:
        _decode_any(body)  # typed decoding stops at the first invalid value; syntax errors may follow
    except msgspec.ValidationError:
        pass  # a number beyond int64/float64 (1e999999) is valid JSON: its event is refused below
    except msgspec.DecodeError as exc:
        raise _malformed(exc, body) from None
    if start == b"[":
        try:
            raws = _decode_raw_list(body)  # checks the syntax past such a number too
        except msgspec.DecodeError as exc:
            raise _malformed(exc, body) from None
    elif start == b"{":
        raws = [msgspec.Raw(body)]
    else:
        raise BodyError(400, "bad_body", "body must be an event object or an array of event objects")
    if len(raws) > max_events:
        raise _too_many(max_events)
    return None, raws


def _ndjson_items(body: bytes, max_events: int) -> tuple[list[Event] | None, list[msgspec.Raw]]:
    numbered = [(n, line) for n, line in enumerate(body.split(b"\n"), 1) if line.strip()]
    if len(numbered) > max_events:
        raise _too_many(max_events)
    lines = [line for _, line in numbered]
    try:
        return _decode_list(b"[" + b",".join(lines) + b"]"), []
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    for lineno, line in numbered:  # find the line to name, or fall back to per-event errors
        try:
            _decode_any(line)
        except msgspec.ValidationError:
            pass  # a number beyond int64/float64: its event is refused naming the field
        except msgspec.DecodeError as exc:
            raise _malformed(exc, line, lineno - 1) from None
    return None, [msgspec.Raw(line) for line in lines]


# ---------------------------------------------------------------- ids and time


def uuid7(unix_ms: int) -> str:
    """RFC 9562 UUIDv7: 48-bit milliseconds, version 7, variant 10, 74 random bits."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms << 80) | (0x7 << 76) | ((rand >> 68) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class RequestContext:
    """What every event of one request shares: the receive time and the future limit."""

    __slots__ = ("received_ns", "received_ms", "received_at_str", "_latest", "_latest_str", "rules")

    def __init__(self, received_ns: int, rules: ProjectRuleSet | None = None):
        #: the tenant's project mapping rules, for events without a project
        self.rules = rules
        self.received_ns = received_ns
        self.received_ms = received_ns // 1_000_000
        self.received_at_str = format_epoch_ms(self.received_ms)
        self._latest: datetime | None = None
        self._latest_str: str | None = None

    @property
    def latest(self) -> datetime:
        """Latest event time accepted (computed only for events that carry a timestamp)."""
        if self._latest is None:
            self._latest = EARLIEST + timedelta(microseconds=self.received_ns // 1000) + MAX_FUTURE  # exact, no float
        return self._latest

    @property
    def latest_str(self) -> str:
        """``latest`` in the canonical form, to compare canonical timestamps as strings."""
        if self._latest_str is None:
            self._latest_str = format_epoch_ms(self.received_ms + _MAX_FUTURE_MS)
        return self._latest_str

    @classmethod
    def now(cls, rules: ProjectRuleSet | None = None) -> RequestContext:
        return cls(time.time_ns(), rules)


_EARLIEST_STR = "1970-01-01T00:00:00.000Z"


def _timestamp(value: str, ctx: RequestContext, errors: FieldErrors) -> str | None:
    if len(value) == 24 and value[23] == "Z" and value[19] == "." and value[10] == "T":
        # the canonical form (the common case): once it parses, strings compare as their instants do
        try:
            datetime.fromisoformat(value)
        except ValueError:
            errors.append({"field": "timestamp", "message": f"not an RFC 3339 timestamp: {value!r}"})
            return None
        if value > ctx.latest_str:
            errors.append({"field": "timestamp", "message": "more than 5 minutes in the future"})
        elif value < _EARLIEST_STR:
            errors.append({"field": "timestamp", "message": "before 1970-01-01T00:00:00Z"})
        else:
            return value
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        errors.append({"field": "timestamp", "message": f"not an RFC 3339 timestamp: {value[:64]!r}"})
        return None
    if dt.tzinfo is None:
        errors.append({"field": "timestamp", "message": "must be an RFC 3339 date-time with a UTC offset or Z"})
    elif dt > ctx.latest:
        errors.append({"field": "timestamp", "message": "more than 5 minutes in the future"})
    elif dt < EARLIEST:
        errors.append({"field": "timestamp", "message": "before 1970-01-01T00:00:00Z"})
    else:
        return format_timestamp(dt)
    return None


# ---------------------------------------------------------------- names and amounts


@functools.lru_cache(maxsize=4096)  # a fleet uses few names; a hit costs ~0.1 µs against 0.2-0.6 µs
def normalise_names(provider: str | None, model: str) -> tuple[str | None, str]:
    """Lower-case and trim; take the provider from ``provider/model`` when none is given.

    ``openai/gpt-4o`` becomes provider ``openai``, model ``gpt-4o`` — unless the catalog knows the
    model only by its full id (``perplexity/glm-5.3-flash``), where splitting would lose the price.
    Matching against the price catalog (Bedrock/Azure ids, dated snapshots) stays in the pricing
    stage; this only asks it whether a split keeps the model known.
    """
    model = model.strip().lower()
    if provider is not None:
        provider = provider.strip().lower()
    if "/" in model:
        prefix, rest = model.split("/", 1)
        if prefix and rest and (provider is None or provider == prefix):
            provider = prefix
            if _priced(prefix, rest) or not _priced(prefix, model):
                model = rest
    return provider, model


def _priced(provider: str, model: str) -> bool:
    return default_catalog().resolve(provider, model).model is not None


def _cost(value: str | float | int, errors: FieldErrors) -> str | None:
    try:
        nanos = EVENT_COST.nanos(value)
    except MoneyError as exc:
        errors.append({"field": "cost_usd", "message": exc.message})
        return None
    return format_usd(nanos)  # one spelling per amount: "0.0100", 0.01 and "1E-2" all become "0.01"


# ---------------------------------------------------------------- events


def _blank(errors: FieldErrors, name: str) -> None:
    errors.append({"field": name, "message": "must not be blank"})


def _token_consistency(ev: Event, errors: FieldErrors) -> None:
    cache_write = ev.cache_write_tokens
    if (
        ev.cache_read_tokens + cache_write + ev.input_audio_tokens <= ev.input_tokens
        and ev.cache_write_1h_tokens <= cache_write
        and ev.reasoning_tokens + ev.output_audio_tokens <= ev.output_tokens
    ):
        return  # consistent (the common case, checked without naming anything)
    for sub, parent in TOKEN_PARENTS.items():
        n, total = getattr(ev, sub), getattr(ev, parent)
        if n > total:
            errors.append({"field": sub, "message": f"{sub} ({n}) exceeds {parent} ({total})"})
    # the parts are disjoint (the pricing stage prices each once), so together they fit too
    parts = ev.cache_read_tokens + ev.cache_write_tokens + ev.input_audio_tokens
    if parts > ev.input_tokens:
        errors.append(
            {
                "field": "input_tokens",
                "message": f"input_tokens ({ev.input_tokens}) is less than cache_read_tokens + cache_write_tokens + "
                f"input_audio_tokens ({parts}): input_tokens must include them",
            }
        )
    extra = ev.reasoning_tokens + ev.output_audio_tokens
    if extra > ev.output_tokens:
        errors.append(
            {
                "field": "output_tokens",
                "message": f"output_tokens ({ev.output_tokens}) is less than reasoning_tokens + output_audio_tokens "
                f"({extra}): output_tokens must include them",
            }
        )


def _apply_usage(ev: Event, errors: FieldErrors) -> None:
    given = [f for f in TOKEN_FIELDS if getattr(ev, f)] + [
        f for f in ("input_tokens", "output_tokens") if getattr(ev, f) == 0
    ]
    if given:
        errors.append(
            {"field": "usage", "message": f"give either usage or token fields, not both (also got {', '.join(given)})"}
        )
        return
    counts, usage_errors = normalise_usage(ev.usage)
    if usage_errors:
        errors.extend(usage_errors)
        return
    for name, value in counts.items():
        setattr(ev, name, value)
    ev.usage = None


def _finish(ev: Event, ctx: RequestContext) -> FieldErrors:
    """Complete a type-checked event in place (defaults, normal forms); return what is wrong with it."""
    errors: FieldErrors = []
    if ev.event_id is None:
        ev.event_id = uuid7(ctx.received_ms)
    elif ev.event_id.isspace():
        _blank(errors, "event_id")
    ev.timestamp = ctx.received_at_str if ev.timestamp is None else _timestamp(ev.timestamp, ctx, errors)
    if ev.agent is None:
        ev.agent = "default"
    elif ev.agent.isspace():
        _blank(errors, "agent")
    if ev.project is None:
        ev.project = ctx.rules.project_for(ev.agent, ev.session_label) if ctx.rules is not None else None
        if ev.project is None:
            errors.append({"field": "project", "message": "field required (no project mapping rule matched)"})
    elif ev.project.isspace():
        _blank(errors, "project")
    if ev.status is None:
        ev.status = "ok"

    ev.provider, ev.model = normalise_names(ev.provider, ev.model)
    if not ev.model:
        _blank(errors, "model")
    if not ev.provider:
        if ev.provider is None:
            errors.append({"field": "provider", "message": "field required (or give model as 'provider/model')"})
        else:
            _blank(errors, "provider")

    if ev.usage is not None:
        _apply_usage(ev, errors)
    if ev.input_tokens is None:
        ev.input_tokens = 0
    if ev.output_tokens is None:
        ev.output_tokens = 0
    if not errors:
        _token_consistency(ev, errors)

    if ev.cost_usd is not None:
        ev.cost_usd = _cost(ev.cost_usd, errors)
    return errors


# ---------------------------------------------------------------- rejections


_AT_PATH = re.compile(r" - at `\$\.?([^`\[]*)[^`]*`$")
_AT_KEY = re.compile(r" - at `key` in `\$\.([^`\[]*)[^`]*`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


def _type_errors(raw: msgspec.Raw, exc: msgspec.ValidationError) -> FieldErrors:
    """Field errors of an event msgspec refused, naming every unknown field (not just the first)."""
    message = str(exc).replace(" | null", "")
    try:
        obj = _decode_any(raw)
    except msgspec.DecodeError:
        obj = None
    if type(obj) is dict and not obj.keys() <= EVENT_FIELDS:
        errors = []
        for name in sorted(obj.keys() - EVENT_FIELDS):
            close = difflib.get_close_matches(name, EVENT_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append({"field": name, "message": f"unknown field {name!r}{hint}"})
        return errors
    if m := _AT_KEY.search(message):
        return [{"field": m.group(1), "message": message[: m.start()] + " (a key)"}]
    if m := _AT_PATH.search(message):
        return [{"field": m.group(1) or "event", "message": message[: m.start()]}]
    if m := _NAMED.search(message):
        return [{"field": m.group(1), "message": message}]
    return [{"field": "event", "message": message.replace("`object`", "a JSON object (one event)")}]


def _claimed_id(raw: msgspec.Raw) -> str | None:
    try:
        obj = _decode_any(raw)
    except msgspec.DecodeError:
        return None
    claimed = obj.get("event_id") if type(obj) is dict else None
    return claimed if type(claimed) is str else None


# ---------------------------------------------------------------- requests


@dataclass
class Validated:
    """Outcome of one request's events: accepted ones grouped by project, rejections by index."""

    by_project: dict[str, list[Event]]
    event_ids: list[str]
    rejected: list[dict[str, Any]]

    @property
    def accepted(self) -> int:
        return len(self.event_ids)


def validate_body(body: bytes, ndjson: bool, max_events: int, ctx: RequestContext) -> Validated:
    """Parse and validate a request body; BodyError for problems of the request as a whole."""
    if not _first_byte(body):
        raise BodyError(400, "no_events", "body holds no events")
    events, raws = _ndjson_items(body, max_events) if ndjson else _json_items(body, max_events)
    by_project: dict[str, list[Event]] = {}
    event_ids: list[str] = []
    rejected: list[dict[str, Any]] = []
    if events is None:
        events = []
        for index, raw in enumerate(raws):
            try:
                events.append(_decode_one(raw))
            except msgspec.ValidationError as exc:
                rejected.append({"index": index, "event_id": _claimed_id(raw), "errors": _type_errors(raw, exc)})
                events.append(None)  # type: ignore[arg-type]  # keeps indexes aligned
    if not events:
        raise BodyError(400, "no_events", "body holds no events")
    for index, ev in enumerate(events):
        if ev is None:
            continue
        claimed = ev.event_id
        errors = _finish(ev, ctx)
        if errors:
            rejected.append({"index": index, "event_id": claimed, "errors": errors})
            continue
        event_ids.append(ev.event_id)  # type: ignore[arg-type]
        group = by_project.get(ev.project)
        if group is None:
            by_project[ev.project] = [ev]
        else:
            group.append(ev)
    rejected.sort(key=lambda r: r["index"])
    return Validated(by_project, event_ids, rejected)


def validate_objects(objs: list[dict[str, Any]], ctx: RequestContext) -> Validated:
    """Event objects built by the gateway itself (the OTLP mapping) through the same checks as a
    request's: the ``Event`` types and limits, then ``_finish``. Rejections carry the index in ``objs``.
    All objects are converted in one call (C); when one fails, each again, to name it."""
    by_project: dict[str, list[Event]] = {}
    event_ids: list[str] = []
    rejected: list[dict[str, Any]] = []
    try:
        events: list[Event | None] = _convert_events(objs)
    except msgspec.ValidationError:
        events = []
        for index, obj in enumerate(objs):
            try:
                events.append(_convert_event(obj))
            except msgspec.ValidationError as exc:
                message = str(exc)
                m = _AT_PATH.search(message)
                name = (m.group(1) or "event") if m else "event"
                errors = [{"field": name, "message": message[: m.start()] if m else message}]
                rejected.append({"index": index, "event_id": obj.get("event_id"), "errors": errors})
                events.append(None)
    for index, ev in enumerate(events):
        if ev is None:
            continue
        errors = _finish(ev, ctx)
        if errors:
            rejected.append({"index": index, "event_id": objs[index].get("event_id"), "errors": errors})
            continue
        event_ids.append(ev.event_id)  # type: ignore[arg-type]
        group = by_project.get(ev.project)  # type: ignore[arg-type]
        if group is None:
            by_project[ev.project] = [ev]  # type: ignore[index]
        else:
            group.append(ev)
    rejected.sort(key=lambda r: r["index"])
    return Validated(by_project, event_ids, rejected)


def _convert_event(obj: dict[str, Any]) -> Event:
    return msgspec.convert(obj, Event)


def _convert_events(objs: list[dict[str, Any]]) -> list[Event | None]:
    return msgspec.convert(objs, list[Event])  # type: ignore[arg-type]


def validate_event(obj: Any, ctx: RequestContext | None = None) -> tuple[dict[str, Any] | None, FieldErrors]:
    """One JSON-able object through the same path as a request: ``(normalised, [])`` or ``(None, errors)``."""
    result = validate_body(msgspec.json.encode([obj]), False, 1, ctx or RequestContext.now())
    if result.rejected:
        return None, result.rejected[0]["errors"]
    (event,) = next(iter(result.by_project.values()))
    return msgspec.to_builtins(event), []


def rejection_reasons(rejected: list[dict[str, Any]]) -> list[str]:
    """One metrics label per rejected event: the first field named (bounded to contract fields)."""
    reasons = []
    for r in rejected:
        name = r["errors"][0]["field"].split(".", 1)[0]
        reasons.append(name if name in EVENT_FIELDS or name == "event" else "unknown_field")
    return reasons
