"""What the proxy reads from the traffic it forwards: the route's API flavour, the request's
attribution and cost bounds, usage from responses and SSE streams. Pure: no IO imports.

Usage is extracted by genai-prices (``Provider.extract_usage`` with the route's API flavour: OpenAI
``chat``, ``responses``, ``embeddings``; Anthropic ``default``), which knows each provider's wire
shape, including Anthropic's uncached ``input_tokens`` (it adds cache reads and writes into the
total, as contract v1 counts). The provider-level call is used rather than the module's
``extract_usage``, which raises LookupError for a model missing from its catalog: the proxy meters
every call, and the pricing stage decides whether the model has a price.

Streams (docs/proxy.md):
- OpenAI chat/completions: usage comes in one extra chunk (``choices: []``) before ``[DONE]``,
  only when the request set ``stream_options.include_usage``; the proxy sets it when the client
  did not and drops that chunk before the client sees it.
- OpenAI Responses: the final ``response.completed`` (or ``response.incomplete`` /
  ``response.failed``) event carries the response with its usage.
- Anthropic messages: ``message_start.message.usage`` first, then each ``message_delta.usage``
  OVERWRITES the fields it carries (the values are cumulative; adding them would over-count).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from genai_prices.data_snapshot import get_snapshot

from spendstream.money import MAX_TOKENS_PER_EVENT

OPENAI, ANTHROPIC = "openai", "anthropic"

#: (provider, path after /v1/) -> (genai-prices api flavour, event operation)
_FLAVOURS: dict[tuple[str, str], tuple[str, str]] = {
    (OPENAI, "chat/completions"): ("chat", "chat"),
    (OPENAI, "completions"): ("chat", "text_completion"),
    (OPENAI, "responses"): ("responses", "responses"),
    (OPENAI, "embeddings"): ("embeddings", "embeddings"),
    (ANTHROPIC, "messages"): ("default", "chat"),
}


def flavour(provider: str, path: str) -> tuple[str | None, str]:
    """(genai-prices api flavour or None when the route has no known usage shape, operation)."""
    found = _FLAVOURS.get((provider, path.strip("/")))
    if found is not None:
        return found
    return None, path.strip("/").split("/", 1)[0][:64] or "call"


# ---------------------------------------------------------------- usage -> contract v1 tokens


def _tokens(usage: Any) -> dict[str, int]:
    """genai-prices ``Usage`` -> contract v1 token fields (input totals include cache and audio).

    Reads the values the provider reported (a ``Usage`` keeps them, validated, as its instance
    attributes): an attribute it was not given would be inferred from the others on every access
    (~40 µs each, most of the proxy's metering cost) and may raise for overlapping keys."""
    reported = vars(usage)

    def get(name: str) -> int:
        value = reported.get(name) or 0
        return min(int(value), MAX_TOKENS_PER_EVENT)

    tokens = {
        "input_tokens": get("input_tokens"),
        "output_tokens": get("output_tokens"),
        "cache_read_tokens": get("cache_read_tokens"),
        "cache_write_tokens": get("cache_write_tokens"),
        "cache_write_1h_tokens": get("cache_write_1h_tokens"),
        "reasoning_tokens": get("output_reasoning_tokens"),
        "input_audio_tokens": get("input_audio_tokens"),
        "output_audio_tokens": get("output_audio_tokens"),
    }
    # contract v1 subsets must fit their parents; a provider's object that breaks this is trimmed
    # to what can be priced rather than dropped
    tokens["cache_write_1h_tokens"] = min(tokens["cache_write_1h_tokens"], tokens["cache_write_tokens"])
    inputs = tokens["cache_read_tokens"] + tokens["cache_write_tokens"] + tokens["input_audio_tokens"]
    tokens["input_tokens"] = max(tokens["input_tokens"], inputs)
    outputs = tokens["reasoning_tokens"] + tokens["output_audio_tokens"]
    tokens["output_tokens"] = max(tokens["output_tokens"], outputs)
    return tokens


def extract(provider: str, api_flavour: str | None, response: Any) -> tuple[str | None, dict[str, int]] | None:
    """(model, token fields) of a provider response object, or None when it carries no usage."""
    if type(response) is not dict or type(response.get("usage")) is not dict:
        return None
    if api_flavour is None:  # a route without a known flavour: guess from the usage's shape
        if provider == ANTHROPIC:
            api_flavour = "default"
        else:
            api_flavour = "chat" if "prompt_tokens" in response["usage"] else "responses"
    try:
        model, usage = (
            get_snapshot().find_provider(None, provider, None).extract_usage(response, api_flavor=api_flavour)
        )
    except (ValueError, LookupError, TypeError, KeyError):
        return None
    return (model if isinstance(model, str) else None), _tokens(usage)


def extract_body(provider: str, api_flavour: str | None, body: bytes) -> tuple[str | None, dict[str, int]] | None:
    try:
        response = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return extract(provider, api_flavour, response)


_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
#: what a large body keeps of its start and end to find its model and usage
HEAD_BYTES = 4096
TAIL_BYTES = 64 * 1024


def extract_head_tail(
    provider: str, api_flavour: str | None, head: bytes, tail: bytes
) -> tuple[str | None, dict[str, int]] | None:
    """Usage of a body too large to keep whole (embeddings of many inputs): the model from its
    first bytes, the last ``"usage": {...}`` object from its last bytes. The providers put
    ``usage`` at the end of these bodies; its object holds only numbers and nested objects."""
    starts = [m.end() - 1 for m in _USAGE.finditer(tail)]
    if not starts:
        return None
    start, depth = starts[-1], 0
    for end in range(start, len(tail)):
        c = tail[end]
        if c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth == 0:
                break
    else:
        return None
    try:
        usage = orjson.loads(tail[start : end + 1])
    except orjson.JSONDecodeError:
        return None
    model = _MODEL.search(head)
    return extract(provider, api_flavour, {"model": model.group(1).decode() if model else "", "usage": usage})


# ---------------------------------------------------------------- requests


@dataclass
class CallRequest:
    """What the proxy reads from a request body (JSON only; other bodies pass through unread)."""

    model: str | None = None
    stream: bool = False
    #: output tokens the call may produce at most, as the request caps it (None: no cap)
    max_output_tokens: int | None = None
    user: str | None = None
    #: the body to forward when the proxy changed it (OpenAI streams: usage asked for)
    rewritten: bytes | None = None
    #: the proxy asked for the stream's usage chunk: drop it before the client sees it
    drop_usage_chunk: bool = False
    parsed: bool = False


def _cap(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if type(value) is int and value >= 0:
            return value
    return None


def read_request(provider: str, path: str, body: bytes) -> CallRequest:
    try:
        obj = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return CallRequest()
    if type(obj) is not dict:
        return CallRequest()
    call = CallRequest(parsed=True)
    model = obj.get("model")
    call.model = model if isinstance(model, str) and model else None
    call.stream = obj.get("stream") is True
    if provider == ANTHROPIC:
        call.max_output_tokens = _cap(obj, "max_tokens")
        metadata = obj.get("metadata")
        if type(metadata) is dict and isinstance(metadata.get("user_id"), str):
            call.user = metadata["user_id"]
        return call
    call.max_output_tokens = _cap(obj, "max_completion_tokens", "max_tokens", "max_output_tokens")
    if isinstance(obj.get("user"), str):
        call.user = obj["user"]
    if call.stream and path.strip("/") in ("chat/completions", "completions"):
        options = obj.get("stream_options")
        if type(options) is not dict or options.get("include_usage") is not True:
            obj["stream_options"] = {**(options if type(options) is dict else {}), "include_usage": True}
            call.rewritten = orjson.dumps(obj)
            call.drop_usage_chunk = True
    return call


# ---------------------------------------------------------------- SSE


class SseSplitter:
    """Splits a byte stream into SSE events, each with its own bytes exactly (separator included).

    Memory is bounded: an event longer than ``max_event_bytes`` is handed on in pieces, unparsed
    (``parse`` False), until its end."""

    __slots__ = ("max_event_bytes", "_buf", "_oversized")

    def __init__(self, max_event_bytes: int):
        self.max_event_bytes = max_event_bytes
        self._buf = b""
        self._oversized = False

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes, bool]]:
        """(raw bytes, parse) pieces; raw bytes of complete events, or of an oversized one."""
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            end = _event_end(buf, start)
            if end < 0:
                break
            yield buf[start:end], not self._oversized
            self._oversized = False
            start = end
        rest = buf[start:]
        if len(rest) > self.max_event_bytes:
            yield rest, False
            self._oversized = True
            rest = b""
        self._buf = rest

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


def _event_end(buf: bytes, start: int) -> int:
    """End (exclusive) of the first complete event at ``start``, or -1."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


def sse_fields(event: bytes) -> tuple[str | None, bytes]:
    """(event name, data) of one SSE event's bytes."""
    name, data = None, []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


@dataclass
class StreamMeter:
    """Follows one stream's events: the usage so far and whether to pass each event on."""

    provider: str
    api_flavour: str | None
    drop_usage_chunk: bool = False
    model: str | None = None
    tokens: dict[str, int] | None = None
    #: Anthropic: the cumulative usage object, message_start then every message_delta over it
    _anthropic_usage: dict[str, Any] = field(default_factory=dict)
    completed: bool = False

    def event(self, raw: bytes) -> bool:
        """Read one complete event; False when it must not reach the client (the injected usage chunk)."""
        name, data = sse_fields(raw)
        if not data or data == b"[DONE]":
            if data == b"[DONE]":
                self.completed = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if type(obj) is not dict:
            return True
        if self.provider == ANTHROPIC:
            self._anthropic(obj)
            return True
        if self.api_flavour == "responses":
            kind = obj.get("type")
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.completed = kind == "response.completed"
                found = extract(self.provider, "responses", obj.get("response"))
                if found is not None:
                    self.model, self.tokens = found[0] or self.model, found[1]
            elif kind == "response.created" and type(obj.get("response")) is dict:
                self.model = obj["response"].get("model") or self.model
            return True
        # chat / completions chunks
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if type(obj.get("usage")) is dict:
            found = extract(self.provider, self.api_flavour or "chat", obj)
            if found is not None:
                self.tokens = found[1]
            if self.drop_usage_chunk and obj.get("choices") == []:
                return False
        return True

    def _anthropic(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start" and type(obj.get("message")) is dict:
            message = obj["message"]
            self.model = message.get("model") or self.model
            if type(message.get("usage")) is dict:
                self._anthropic_usage = dict(message["usage"])
        elif kind == "message_delta" and type(obj.get("usage")) is dict:
            # cumulative: the fields present replace the earlier values, never add to them; a
            # null leaves the earlier value (some hosts send nulls for what they do not repeat)
            for key, value in obj["usage"].items():
                if value is not None:
                    self._anthropic_usage[key] = value
        elif kind == "message_stop":
            self.completed = True

    def usage(self) -> dict[str, int] | None:
        """The stream's usage so far. Anthropic's cumulative object is extracted once, here, not at
        every event (genai-prices' extractor costs ~0.1 ms a call)."""
        if self.provider == ANTHROPIC and self._anthropic_usage:
            found = extract(self.provider, "default", {"model": self.model or "", "usage": self._anthropic_usage})
            self.tokens = found[1] if found is not None else None
        return self.tokens
