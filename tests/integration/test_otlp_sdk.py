"""The OpenTelemetry SDK's own OTLP/HTTP exporter, and the real ``openai`` SDK instrumented by the
OTel contrib GenAI instrumentation, against the real gateway (uvicorn, real HTTP), the pricing and
sink stages and ClickHouse.

These need packages the lock does not hold yet (``opentelemetry-sdk``,
``opentelemetry-exporter-otlp-proto-http``, ``opentelemetry-instrumentation-openai-v2``,
``openai``): the module is skipped when they are missing. Verified with opentelemetry-sdk 1.45.2,
opentelemetry-exporter-otlp-proto-http 1.45.2, opentelemetry-instrumentation-openai-v2 2.4b0
(with opentelemetry-util-genai 1.1b0) and openai 3.63.0.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.exporter.otlp.proto.http import Compression  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402
from test_otlp_ingest import _genai_usage, otlp_stack, stored  # noqa: E402,F401  (otlp_stack is a fixture)

from ingest_gateway.app import create_app  # noqa: E402
from spendstream.contracts import usd_to_nanos  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


class ThreadServer:
    """An ASGI app behind uvicorn in a background thread (real sockets, real lifespan)."""

    def __init__(self, app: Any, port: int, ready_path: str = "/healthz"):
        self.url = f"http://127.0.0.1:{port}"
        self._ready = self.url + ready_path
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self._ready, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self._thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


def check_costs(rows: dict[str, dict]) -> None:
    from genai_prices import calc_price

    genai_usage = _genai_usage()
    for event_id, row in rows.items():
        usage = genai_usage({k: row[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                                  "cache_write_tokens", "reasoning_tokens")})  # fmt: skip
        want = calc_price(usage, row["model"], provider_id=row["provider"], genai_request_timestamp=row["timestamp"])
        assert row["pricing_status"] == "priced", row
        assert row["cost_nanos"] == usd_to_nanos(want.total_price) > 0, (event_id, row["model"])


async def test_the_sdk_exporter_to_the_gateway(otlp_stack):
    settings, key = otlp_stack
    captured = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-agent", "spendstream.project": "sdk"}))
    provider.add_span_processor(SimpleSpanProcessor(captured))
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span(
        "invoke_agent planner",
        kind=SpanKind.INTERNAL,
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
                    "gen_ai.conversation.id": "conv-7", "gen_ai.usage.input_tokens": 99_999},
    ):  # fmt: skip
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT) as s:  # new names + cache read
            s.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.usage.input_tokens": 4000, "gen_ai.usage.output_tokens": 250,
                "gen_ai.usage.cache_read.input_tokens": 2048,
            })  # fmt: skip
        with tracer.start_as_current_span("chat o3-mini", kind=SpanKind.CLIENT) as s:  # deprecated + reasoning
            s.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "o3-mini",
                "gen_ai.usage.prompt_tokens": 900, "gen_ai.usage.completion_tokens": 1200,
                "gen_ai.usage.reasoning.output_tokens": 1000,
            })  # fmt: skip
            s.set_status(Status(StatusCode.ERROR))
        with tracer.start_as_current_span("chat claude", kind=SpanKind.CLIENT) as s:  # cache_write (new name)
            s.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-3-5-sonnet-20241022",
                "gen_ai.usage.input_tokens": 3000, "gen_ai.usage.output_tokens": 100,
                "gen_ai.usage.cache_write.input_tokens": 1500, "gen_ai.usage.cache_read.input_tokens": 500,
            })  # fmt: skip
        with tracer.start_as_current_span("execute_tool search", attributes={"gen_ai.operation.name": "execute_tool"}):
            pass
    spans = captured.get_finished_spans()
    assert len(spans) == 5

    port = settings.gateway.port
    with ThreadServer(create_app(settings), port):
        exporter = OTLPSpanExporter(
            endpoint=f"http://127.0.0.1:{port}/otlp/v1/traces",
            headers={"Authorization": f"Bearer {key}"},
            compression=Compression.Gzip,
        )
        first = await asyncio.to_thread(exporter.export, spans)
        retried = await asyncio.to_thread(exporter.export, spans)  # the same spans again: stored once
        assert first == retried == SpanExportResult.SUCCESS
        wrong_key = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/otlp/v1/traces",
                                     headers={"Authorization": "Bearer nope"})  # fmt: skip
        assert await asyncio.to_thread(wrong_key.export, spans) == SpanExportResult.FAILURE
        exporter.shutdown()
        wrong_key.shutdown()

    rows = await asyncio.to_thread(stored, settings, 3)
    assert len(rows) == 3  # three chat spans; the agent and tool spans cost nothing
    check_costs(rows)
    by_model = {row["model"]: row for row in rows.values()}
    assert set(by_model) == {"gpt-4o-2024-08-06", "o3-mini", "claude-3-5-sonnet-20241022"}
    assert by_model["gpt-4o-2024-08-06"]["cache_read_tokens"] == 2048
    assert (by_model["o3-mini"]["input_tokens"], by_model["o3-mini"]["reasoning_tokens"]) == (900, 1000)
    assert by_model["o3-mini"]["status"] == "error"
    assert by_model["claude-3-5-sonnet-20241022"]["cache_write_tokens"] == 1500
    assert {(r["project"], r["agent"], r["session_id"]) for r in rows.values()} == {("sdk", "planner", "conv-7")}
    ids = {f"otel-{s.context.trace_id:032x}-{s.context.span_id:016x}" for s in spans if s.name.startswith("chat")}
    assert set(rows) == ids


CHAT_RESPONSE = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1_764_000_000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None}, "finish_reason": "stop",
         "logprobs": None}
    ],
    "usage": {
        "prompt_tokens": 1500, "completion_tokens": 60, "total_tokens": 1560,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_1",
}  # fmt: skip


async def fake_openai(scope, receive, send):
    """The upstream: OpenAI's chat completions wire shape (openai-python types/chat)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    import orjson

    ok = scope["path"] == "/v1/chat/completions"
    body = orjson.dumps(CHAT_RESPONSE if ok else {"ok": True})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"req_1")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def test_openai_sdk_with_the_contrib_genai_instrumentation(otlp_stack, monkeypatch):
    openai = pytest.importorskip("openai")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.openai_v2")
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from spendstream.ports import free_port

    settings, key = otlp_stack
    port, upstream_port = settings.gateway.port, free_port()
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    exporter = OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{port}/otlp/v1/traces", headers={"Authorization": f"Bearer {key}"}
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    # the current GenAI conventions (gen_ai.provider.name; the default mode writes gen_ai.system)
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
    instrumentor = instrumentation.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with ThreadServer(create_app(settings), port), ThreadServer(fake_openai, upstream_port, "/"):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-test", max_retries=0)

            def call() -> Any:
                return client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
                )

            for _ in range(2):
                response = await asyncio.to_thread(call)
                assert response.usage.prompt_tokens == 1500
            assert await asyncio.to_thread(provider.force_flush)
    finally:
        instrumentor.uninstrument()
        provider.shutdown()

    rows = await asyncio.to_thread(stored, settings, 2)
    assert len(rows) == 2
    check_costs(rows)
    for row in rows.values():
        assert (row["provider"], row["model"], row["operation"]) == ("openai", "gpt-4o-mini-2024-07-18", "chat")
        # measured: instrumentation-openai-v2 2.4b0 (util-genai 1.1b0) does not report
        # prompt_tokens_details.cached_tokens on chat spans, in either semconv mode, so a cached
        # prompt is priced at the uncached rate (an over-count Spendstream cannot see from the span)
        assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (1500, 60, 0)
        assert (row["agent"], row["project"]) == ("support-bot", "default")
        assert row["latency_ms"] is not None
