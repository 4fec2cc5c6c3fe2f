"""Request bodies -> validated, normalised contract v1 events. Pure: no Kafka/HTTP/ClickHouse imports.

Validation is hand-written over the dicts orjson returns: it reports every problem of an event
(not only the first), names each field, and costs a few microseconds per event.
"""

from __future__ import annotations

import difflib
import os
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ingest_gateway.usage import FieldErrors, normalise_usage, token_count_error
from spendstream.contracts import TOKEN_FIELDS, TOKEN_PARENTS

MAX_FUTURE = timedelta(minutes=5)
#: the past is open (backfills are normal) down to the Unix epoch, below which no usage exists
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_ID_LEN = 128
MAX_ATTRIBUTION_LEN = 256
MAX_MODEL_LEN = 256
MAX_TAGS = 32
MAX_TAG_KEY_LEN = 128
MAX_TAG_VALUE_LEN = 256
MAX_COST_USD = Decimal(1_000_000)
MAX_LATENCY_MS = 2**31 - 1
STATUSES = ("ok", "error")

EVENT_FIELDS: frozenset[str] = frozenset(
    (
        "event_id", "timestamp", "project", "agent", "user", "session_id", "operation", "tags",
        "provider", "model", "usage", "cost_usd", "latency_ms", "status", *TOKEN_FIELDS,
    )
)  # fmt: skip
_TOKEN_FIELD_SET = frozenset(TOKEN_FIELDS)
_SUBSETS = frozenset(TOKEN_PARENTS)
_ATTRIBUTION_FIELDS = ("user", "session_id", "operation")

JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/jsonlines")


class BodyError(Exception):
    """The request as a whole is unusable; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
    """Undo ``Content-Encoding: gzip``, refusing to inflate past ``max_bytes`` (zip bombs)."""
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return body
    if enc not in ("gzip", "x-gzip"):
        raise BodyError(415, "unsupported_content_encoding", f"Content-Encoding {enc!r} is not supported: use gzip")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BodyError(400, "bad_gzip", f"request body is not valid gzip: {exc}") from None
    if len(out) > max_bytes:
        raise BodyError(413, "body_too_large", f"decompressed body exceeds {max_bytes} bytes")
    if not inflater.eof:
        raise BodyError(400, "bad_gzip", "request body is truncated gzip")
    return out


def _malformed(exc: orjson.JSONDecodeError, line_offset: int = 0) -> BodyError:
    line = exc.lineno + line_offset
    return BodyError(
        400, "malformed_json", f"malformed JSON at line {line}, column {exc.colno} (byte {exc.pos}): {exc.msg}"
    )


def parse_events(body: bytes, ndjson: bool, max_events: int) -> list[Any]:
    """The raw event objects of a body: one object, an array, or NDJSON lines."""
    if ndjson:
        items: list[Any] = []
        for lineno, line in enumerate(body.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise _malformed(exc, lineno - 1) from None
            if len(items) > max_events:
                break
    else:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _malformed(exc) from None
        if type(doc) is dict:
            items = [doc]
        elif type(doc) is list:
            items = doc
        else:
            raise BodyError(400, "bad_body", "body must be an event object or an array of event objects")
    if not items:
        raise BodyError(400, "no_events", "body holds no events")
    if len(items) > max_events:
        raise BodyError(413, "too_many_events", f"more than {max_events} events in one request")
    return items


# ---------------------------------------------------------------- ids and time


def uuid7(unix_ms: int) -> str:
    """RFC 9562 UUIDv7: 48-bit milliseconds, version 7, variant 10, 74 random bits."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms << 80) | (0x7 << 76) | ((rand >> 68) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_timestamp(dt: datetime) -> str:
    """RFC 3339, UTC, milliseconds, ``Z`` (the wire format of every timestamp)."""
    dt = dt.astimezone(timezone.utc)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f".{dt.microsecond // 1000:03d}Z"
    )


def _is_canonical(ts: str) -> bool:
    return len(ts) == 24 and ts[23] == "Z" and ts[19] == "." and ts[10] == "T"


@dataclass(frozen=True)
class RequestContext:
    """What every event of one request shares: the receive time and the future limit."""

    received_at: datetime
    received_at_str: str = field(init=False)
    received_ms: int = field(init=False)
    latest: datetime = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "received_at_str", format_timestamp(self.received_at))
        object.__setattr__(self, "received_ms", int(self.received_at.timestamp() * 1000))
        object.__setattr__(self, "latest", self.received_at + MAX_FUTURE)

    @classmethod
    def now(cls) -> RequestContext:
        return cls(datetime.now(timezone.utc))


# ---------------------------------------------------------------- names


def normalise_names(provider: str | None, model: str) -> tuple[str | None, str]:
    """Lower-case and trim; take the provider from ``provider/model`` when none is given.

    Only the minimal, lossless part: matching against the price catalog (Bedrock/Azure ids,
    dated snapshots) belongs to the pricing stage.
    """
    model = model.strip().lower()
    if provider is not None:
        provider = provider.strip().lower()
    if "/" in model:
        prefix, rest = model.split("/", 1)
        if provider is None or provider == prefix:
            provider, model = prefix, rest
    return provider, model


# ---------------------------------------------------------------- events


def _short_str(v: Any, max_len: int) -> bool:
    """The common case, checked inline-cheap: a non-blank string of at most ``max_len``."""
    return type(v) is str and 0 < len(v) <= max_len and not v.isspace()


def _str_error(value: Any, max_len: int, min_len: int = 0) -> str | None:
    if type(value) is not str:
        return "must be a string"
    if len(value) > max_len:
        return f"must be at most {max_len} characters"
    if min_len and (not value or value.isspace()):
        return "must not be empty"
    return None


def _unknown_field_errors(raw: dict[str, Any]) -> FieldErrors:
    errors = []
    for name in sorted(map(str, raw.keys() - EVENT_FIELDS)):
        close = difflib.get_close_matches(name, EVENT_FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append({"field": name, "message": f"unknown field {name!r}{hint}"})
    return errors


def _timestamp(value: Any, ctx: RequestContext, errors: FieldErrors) -> str | None:
    if type(value) is not str:
        errors.append({"field": "timestamp", "message": "must be an RFC 3339 string"})
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        errors.append({"field": "timestamp", "message": f"not an RFC 3339 timestamp: {value[:64]!r}"})
        return None
    if dt.tzinfo is None:
        errors.append({"field": "timestamp", "message": "must be an RFC 3339 date-time with a UTC offset or Z"})
        return None
    if dt > ctx.latest:
        errors.append({"field": "timestamp", "message": "more than 5 minutes in the future"})
        return None
    if dt < EARLIEST:
        errors.append({"field": "timestamp", "message": "before 1970-01-01T00:00:00Z"})
        return None
    return value if _is_canonical(value) else format_timestamp(dt)


def _cost(value: Any, errors: FieldErrors) -> str | None:
    if type(value) is str:
        text = value.strip()
    elif type(value) is int or type(value) is float:
        text = repr(value)  # shortest round-trip form: what the client wrote
    else:
        errors.append({"field": "cost_usd", "message": "must be a decimal string or a number"})
        return None
    try:
        d = Decimal(text)
    except InvalidOperation:
        errors.append({"field": "cost_usd", "message": f"not a decimal number: {text[:64]!r}"})
        return None
    if not d.is_finite() or d < 0 or d > MAX_COST_USD:
        errors.append({"field": "cost_usd", "message": f"must be a finite decimal between 0 and {MAX_COST_USD}"})
        return None
    return format(d.normalize(), "f") if d else "0"


def _tags(value: Any, errors: FieldErrors) -> dict[str, str] | None:
    if type(value) is not dict:
        errors.append({"field": "tags", "message": "must be an object of string values"})
        return None
    if len(value) > MAX_TAGS:
        errors.append({"field": "tags", "message": f"at most {MAX_TAGS} tags"})
        return None
    for k, v in value.items():
        if len(k) > MAX_TAG_KEY_LEN:
            errors.append({"field": f"tags.{k[:32]}", "message": f"tag key longer than {MAX_TAG_KEY_LEN}"})
        elif type(v) is not str:
            errors.append({"field": f"tags.{k}", "message": "tag values must be strings"})
        elif len(v) > MAX_TAG_VALUE_LEN:
            errors.append({"field": f"tags.{k}", "message": f"tag value longer than {MAX_TAG_VALUE_LEN}"})
    return value


def _token_consistency(out: dict[str, Any], errors: FieldErrors) -> None:
    if _SUBSETS.isdisjoint(out):
        return
    for sub, parent in TOKEN_PARENTS.items():
        n = out.get(sub, 0)
        if n > out.get(parent, 0):
            errors.append({"field": sub, "message": f"{sub} ({n}) exceeds {parent} ({out.get(parent, 0)})"})
    cached = out.get("cache_read_tokens", 0) + out.get("cache_write_tokens", 0)
    if cached > out.get("input_tokens", 0):
        errors.append(
            {
                "field": "input_tokens",
                "message": f"input_tokens ({out.get('input_tokens', 0)}) is less than cache_read_tokens + "
                f"cache_write_tokens ({cached}): input_tokens must include cache tokens",
            }
        )
    extra = out.get("reasoning_tokens", 0) + out.get("output_audio_tokens", 0)
    if extra > out.get("output_tokens", 0):
        errors.append(
            {
                "field": "output_tokens",
                "message": f"output_tokens ({out.get('output_tokens', 0)}) is less than reasoning_tokens + "
                f"output_audio_tokens ({extra}): output_tokens must include them",
            }
        )


def validate_event(raw: Any, ctx: RequestContext) -> tuple[dict[str, Any] | None, FieldErrors]:
    """``(normalised event, [])`` or ``(None, [{"field", "message"}, ...])``. Never raises."""
    if type(raw) is not dict:
        return None, [{"field": "event", "message": "each event must be a JSON object"}]
    errors: FieldErrors = []
    if not raw.keys() <= EVENT_FIELDS:
        errors.extend(_unknown_field_errors(raw))
    get = raw.get
    out: dict[str, Any] = {}

    v = get("event_id")
    if v is None:
        out["event_id"] = uuid7(ctx.received_ms)
    elif _short_str(v, MAX_ID_LEN):
        out["event_id"] = v
    else:
        errors.append({"field": "event_id", "message": _str_error(v, MAX_ID_LEN, 1)})

    v = get("timestamp")
    out["timestamp"] = ctx.received_at_str if v is None else _timestamp(v, ctx, errors)

    v = get("project")
    if v is None:
        errors.append({"field": "project", "message": "field required"})
    elif _short_str(v, MAX_ID_LEN):
        out["project"] = v
    else:
        errors.append({"field": "project", "message": _str_error(v, MAX_ID_LEN, 1)})

    v = get("agent")
    if v is None:
        out["agent"] = "default"
    elif _short_str(v, MAX_ID_LEN):
        out["agent"] = v
    else:
        errors.append({"field": "agent", "message": _str_error(v, MAX_ID_LEN, 1)})

    for name in _ATTRIBUTION_FIELDS:
        v = get(name)
        if v is not None:
            if type(v) is str and len(v) <= MAX_ATTRIBUTION_LEN:
                out[name] = v
            else:
                errors.append({"field": name, "message": _str_error(v, MAX_ATTRIBUTION_LEN)})

    v = get("tags")
    if v is not None:
        out["tags"] = _tags(v, errors)

    provider = get("provider")
    if provider is not None and not _short_str(provider, MAX_MODEL_LEN):
        errors.append({"field": "provider", "message": _str_error(provider, MAX_MODEL_LEN, 1)})
        provider = None
    model = get("model")
    if model is None:
        errors.append({"field": "model", "message": "field required"})
    elif not _short_str(model, MAX_MODEL_LEN):
        errors.append({"field": "model", "message": _str_error(model, MAX_MODEL_LEN, 1)})
    else:
        provider, out["model"] = normalise_names(provider, model)
        if provider:
            out["provider"] = provider
        elif "provider" not in raw:
            errors.append({"field": "provider", "message": "field required (or give model as 'provider/model')"})
        else:
            errors.append({"field": "provider", "message": "must not be empty"})

    usage = get("usage")
    token_names = raw.keys() & _TOKEN_FIELD_SET
    if usage is not None:
        given = sorted(f for f in token_names if raw[f] is not None)
        if given:
            errors.append(
                {"field": "usage", "message": f"give either usage or token fields, not both (also got {', '.join(given)})"}
            )
        else:
            counts, usage_errors = normalise_usage(usage)
            errors.extend(usage_errors)
            out.update(counts)
    else:
        for name in token_names:
            v = raw[name]
            if v is not None:
                if (problem := token_count_error(v)) is None:
                    if v or name in ("input_tokens", "output_tokens"):
                        out[name] = v
                else:
                    errors.append({"field": name, "message": problem})
        out.setdefault("input_tokens", 0)
        out.setdefault("output_tokens", 0)
    if not errors:
        _token_consistency(out, errors)

    v = get("cost_usd")
    if v is not None:
        out["cost_usd"] = _cost(v, errors)

    v = get("latency_ms")
    if v is not None:
        if type(v) is int and 0 <= v <= MAX_LATENCY_MS:
            out["latency_ms"] = v
        else:
            errors.append({"field": "latency_ms", "message": f"must be an integer between 0 and {MAX_LATENCY_MS}"})

    v = get("status")
    if v is None:
        out["status"] = "ok"
    elif v in STATUSES and type(v) is str:
        out["status"] = v
    else:
        errors.append({"field": "status", "message": "must be 'ok' or 'error'"})

    if errors:
        return None, errors
    return out, errors


# ---------------------------------------------------------------- requests


@dataclass
class Validated:
    """Outcome of one request's events: accepted ones grouped by project, rejections by index."""

    by_project: dict[str, list[dict[str, Any]]]
    event_ids: list[str]
    rejected: list[dict[str, Any]]

    @property
    def accepted(self) -> int:
        return len(self.event_ids)


def validate_events(items: list[Any], ctx: RequestContext) -> Validated:
    by_project: dict[str, list[dict[str, Any]]] = {}
    event_ids: list[str] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(items):
        event, errors = validate_event(raw, ctx)
        if event is None:
            claimed = raw.get("event_id") if type(raw) is dict else None
            rejected.append(
                {"index": index, "event_id": claimed if type(claimed) is str else None, "errors": errors}
            )
            continue
        event_ids.append(event["event_id"])
        group = by_project.get(event["project"])
        if group is None:
            by_project[event["project"]] = [event]
        else:
            group.append(event)
    return Validated(by_project, event_ids, rejected)


def rejection_reasons(rejected: list[dict[str, Any]]) -> list[str]:
    """One metrics label per rejected event: the first field named (bounded to contract fields)."""
    reasons = []
    for r in rejected:
        name = r["errors"][0]["field"].split(".", 1)[0]
        reasons.append(name if name in EVENT_FIELDS or name == "event" else "unknown_field")
    return reasons
