"""ingest_gateway.proxy.usage: SSE splitting, stream metering, request reading."""

from __future__ import annotations

import orjson
import pytest

from ingest_gateway.proxy.service import parse_tags
from ingest_gateway.proxy.usage import SseSplitter, StreamMeter, extract, read_request


def sse(obj, name=None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def test_splitter_keeps_bytes_and_handles_any_chunking():
    stream = sse({"a": 1}) + b"event: x\r\ndata: {}\r\n\r\n" + sse({"b": 2}) + b"data: [DONE]\n\n"
    for size in (1, 3, 7, len(stream)):
        splitter = SseSplitter(1024)
        pieces = [p for i in range(0, len(stream), size) for p in splitter.feed(stream[i : i + size])]
        assert b"".join(raw for raw, _ in pieces) == stream and all(parse for _, parse in pieces)
        assert len(pieces) == 4


def test_splitter_bounds_memory_for_huge_events():
    splitter = SseSplitter(1024)
    huge = b"data: " + b"x" * 5000 + b"\n\n" + sse({"ok": True})
    pieces = [p for i in range(0, len(huge), 512) for p in splitter.feed(huge[i : i + 512])]
    assert b"".join(raw for raw, _ in pieces) == huge
    assert not pieces[0][1] and pieces[-1][1]  # the oversized event is passed on unparsed


def test_anthropic_stream_usage_is_cumulative_never_summed():
    meter = StreamMeter("anthropic", "default")
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {
        "input_tokens": 0, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30,
        "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20}, "output_tokens": 1}}}  # fmt: skip
    assert meter.event(sse(start, "message_start"))
    # a host that reports input 0 at the start and the real value in message_delta
    meter.event(sse({"type": "message_delta", "usage": {"input_tokens": 70, "output_tokens": 5}}, "message_delta"))
    meter.event(sse({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"))
    meter.event(sse({"type": "message_stop"}, "message_stop"))
    assert meter.completed and meter.model == "claude-sonnet-4-5"
    assert meter.usage() == {
        "input_tokens": 200, "output_tokens": 9, "cache_read_tokens": 100, "cache_write_tokens": 30,
        "cache_write_1h_tokens": 20, "reasoning_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
    }  # fmt: skip


def test_openai_usage_chunk_dropped_only_when_injected():
    chunk = {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    injected, asked = StreamMeter("openai", "chat", drop_usage_chunk=True), StreamMeter("openai", "chat")
    assert injected.event(sse({"model": "gpt-4o", "choices": [{"index": 0}], "usage": None}))
    assert not injected.event(sse(chunk)) and asked.event(sse(chunk))
    assert injected.usage()["input_tokens"] == asked.usage()["input_tokens"] == 5


def test_read_request_asks_for_stream_usage_and_reads_caps():
    call = read_request("openai", "chat/completions", orjson.dumps(
        {"model": "gpt-4o", "stream": True, "stream_options": {"x": 1}, "max_tokens": 9, "user": "u"}))  # fmt: skip
    assert call.drop_usage_chunk and orjson.loads(call.rewritten)["stream_options"] == {"x": 1, "include_usage": True}
    assert (call.max_output_tokens, call.user) == (9, "u")
    asked = read_request("openai", "chat/completions", orjson.dumps(
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}))  # fmt: skip
    assert asked.rewritten is None and not asked.drop_usage_chunk
    msg = read_request(
        "anthropic", "messages", orjson.dumps({"model": "c", "max_tokens": 7, "metadata": {"user_id": "x"}})
    )
    assert (msg.max_output_tokens, msg.user, msg.rewritten) == (7, "x", None)
    assert not read_request("openai", "files", b"--multipart--").parsed


def test_extract_unknown_models_still_metered():
    model, tokens = extract(
        "openai", "chat", {"model": "my-finetune", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    )
    assert model == "my-finetune" and (tokens["input_tokens"], tokens["output_tokens"]) == (3, 4)
    assert extract("openai", "chat", {"model": "x"}) is None


def test_parse_tags():
    assert parse_tags("team=search, env = prod,") == {"team": "search", "env": "prod"}
    for bad in ("novalue", "=x", ",".join(f"k{i}=v" for i in range(33))):
        with pytest.raises(ValueError):
            parse_tags(bad)


def test_usage_from_the_first_and_last_bytes_of_a_large_body():
    from ingest_gateway.proxy.usage import extract_head_tail

    body = orjson.dumps({
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"embedding": [0.5] * 50, "usage": "not this one"}] * 100,
        "usage": {"prompt_tokens": 42, "total_tokens": 42},
    })  # fmt: skip
    model, tokens = extract_head_tail("openai", "embeddings", body[:4096], body[-2048:])
    assert model == "text-embedding-3-small" and tokens["input_tokens"] == 42
    assert extract_head_tail("openai", "embeddings", body[:100], body[:100]) is None


def test_spool_is_bounded_and_adopted_by_the_next_process(tmp_path):
    from ingest_gateway.proxy.recorder import Spool

    first = Spool(tmp_path, max_bytes=100)
    assert first.append([b"x" * 40, b"y" * 40, b"z" * 40]) == 2  # the third does not fit
    assert Spool(tmp_path, max_bytes=100).segments() == []  # a live instance's spool is not taken
    first.close()  # its owner gone (the lock released)
    heir = Spool(tmp_path, max_bytes=10_000)
    (segment,) = heir.segments()
    assert segment.read_bytes() == b"x" * 40 + b"\n" + b"y" * 40 + b"\n" and heir.bytes == 82
