"""A fake OpenAI + Anthropic upstream for the proxy tests, and the official SDKs pointed at the proxy.

``FakeUpstream`` serves the recorded wire shapes of tests/fixtures/proxy/ over real HTTP (uvicorn
in a thread): OpenAI under ``/v1/...`` (the OpenAI SDK's base URL includes /v1) and Anthropic under
``/v1/messages`` (its base URL does not). It records every request it receives (method, path,
headers, JSON body) so tests can say what reached the provider and what did not. Streams are sent
event by event with a short pause, so they really arrive in pieces.

``openai_sdk`` / ``anthropic_sdk`` are the real ``openai`` and ``anthropic`` packages' async
clients with their base URL on the proxy (``<gateway>/proxy/openai/v1``, ``<gateway>/proxy/anthropic``),
calling a gateway served by uvicorn over real HTTP (``GatewayServer``), with their own HTTP
clients, which count the attempts they make. ``openai_headers`` remains for the checks below the
SDKs' level (the proxy's own 429, which they would retry).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import uvicorn
from query_api_stack import migrate  # tests/integration is on sys.path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spendstream.ports import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "proxy"


def fixture_json(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def fixture_events(name: str) -> list[bytes]:
    text = (FIXTURES / name).read_bytes()
    return [part + b"\n\n" for part in text.split(b"\n\n") if part.strip()]


def openai_headers(api_key: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "OpenAI/Python 2.8.0",
        "X-Stainless-Lang": "python",
        "X-Stainless-Package-Version": "2.8.0",
        "X-Stainless-Retry-Count": "0",
        **extra,
    }


class Attempts:
    """The HTTP requests an SDK client sent (its retries included): an httpx event hook."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: Any) -> None:
        self.paths.append(request.url.path)


def openai_sdk(gateway_url: str, api_key: str, attempts: Attempts | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
    """``openai.AsyncOpenAI`` with its base URL on the proxy of the gateway at ``gateway_url``."""
    hooks = {"request": [attempts]} if attempts is not None else {}
    return openai.AsyncOpenAI(
        base_url=f"{gateway_url}/proxy/openai/v1", api_key=api_key,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks), **kwargs,
    )  # fmt: skip


def anthropic_sdk(
    gateway_url: str, api_key: str | None, attempts: Attempts | None = None, **kwargs: Any
) -> anthropic.AsyncAnthropic:
    """``anthropic.AsyncAnthropic`` with its base URL on the proxy of the gateway at ``gateway_url``."""
    hooks = {"request": [attempts]} if attempts is not None else {}
    return anthropic.AsyncAnthropic(
        base_url=f"{gateway_url}/proxy/anthropic", api_key=api_key,
        http_client=anthropic.DefaultAsyncHttpxClient(event_hooks=hooks), **kwargs,
    )  # fmt: skip


def request_id(raw: Any) -> str:
    """The proxy's request id (= the event id) of an SDK ``with_raw_response`` answer."""
    return raw.headers["x-spendstream-request-id"]


_DB: dict[str, str] = {}


def proxy_settings(make_settings: Any, **overrides: Any) -> Any:
    """Settings on one migrated database shared by the proxy tests (migrating costs seconds;
    tenants keep the tests apart)."""
    if "name" not in _DB:
        first = make_settings()
        migrate(first)
        _DB["name"] = first.clickhouse.database
    return make_settings(clickhouse={"database": _DB["name"]}, **overrides)


def _strip_usage(events: list[bytes]) -> list[bytes]:
    """A chat stream as sent WITHOUT include_usage: no usage fields, no usage chunk."""
    out = []
    for raw in events:
        data = raw.split(b"data: ", 1)[1].strip()
        if data == b"[DONE]":
            out.append(raw)
            continue
        chunk = json.loads(data)
        if chunk.get("choices") == [] and chunk.get("usage"):
            continue
        chunk.pop("usage", None)
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    return out


class FakeUpstream:
    def __init__(self, chunk_delay_s: float = 0.005, latency_s: float = 0.0):
        self.requests: list[dict[str, Any]] = []
        self.chunk_delay_s = chunk_delay_s
        self.latency_s = latency_s
        self.pause_s = 1.5
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-upstream", daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("fake upstream did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    # -- recording -----------------------------------------------------------------------------
    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        self.requests.append({"method": request.method, "path": request.url.path, "headers": dict(request.headers),
                              "body": body, "raw": raw})  # fmt: skip
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return body or {}

    def _special(self, body: dict[str, Any], anthropic: bool) -> Response | None:
        model = body.get("model", "")
        if model == "rate-limited":
            if anthropic:
                err = {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"}, "request_id": "req_011"}  # fmt: skip
            else:
                err = {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}  # fmt: skip
            return JSONResponse(err, status_code=429, headers={"retry-after": "7", "x-request-id": "req_up_1"})
        return None

    def _stream(
        self, events: list[bytes], cut_after: int | None = None, pause_after: int | None = None
    ) -> StreamingResponse:
        async def gen():
            for i, raw in enumerate(events):
                if cut_after is not None and i == cut_after:
                    raise RuntimeError("upstream connection dropped mid-stream")
                await asyncio.sleep(self.pause_s if i == pause_after else self.chunk_delay_s)
                yield raw

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-request-id": "req_up_stream"})

    # -- OpenAI ----------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        if (special := self._special(body, False)) is not None:
            return special
        name = "openai_chat_reasoning.json" if body.get("model", "").startswith("o4") else "openai_chat.json"
        if not body.get("stream"):
            return Response((FIXTURES / name).read_bytes(), media_type="application/json",
                            headers={"x-request-id": "req_up_chat", "openai-processing-ms": "321"})  # fmt: skip
        events = fixture_events("openai_chat_stream.sse")
        if not (body.get("stream_options") or {}).get("include_usage"):
            events = _strip_usage(events)
        if body.get("model") == "slow-stream":  # the first chunk, then a pause before the rest
            return self._stream(events, pause_after=1)
        return self._stream(events, cut_after=2 if body.get("model") == "cut-stream" else None)

    async def responses(self, request: Request) -> Response:
        body = await self._record(request)
        if body.get("stream"):
            return self._stream(fixture_events("openai_responses_stream.sse"))
        return Response((FIXTURES / "openai_responses.json").read_bytes(), media_type="application/json")

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body.get("input")
        if isinstance(inputs, list) and len(inputs) > 1:  # one vector per input: a large body
            answer = fixture_json("openai_embeddings.json")
            vector = [0.0123456789] * 256
            answer["data"] = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))]
            answer["model"] = body.get("model", answer["model"])
            answer["usage"] = {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}
            return Response(json.dumps(answer).encode(), media_type="application/json")
        return Response((FIXTURES / "openai_embeddings.json").read_bytes(), media_type="application/json")

    async def models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 1, "owned_by": "system"}]})  # fmt: skip

    # -- Anthropic -------------------------------------------------------------------------------
    async def messages(self, request: Request) -> Response:
        body = await self._record(request)
        if (special := self._special(body, True)) is not None:
            return special
        if body.get("stream"):
            cut = 4 if body.get("model") == "cut-stream" else None
            return self._stream(fixture_events("anthropic_message_stream.sse"), cut_after=cut)
        return Response((FIXTURES / "anthropic_message.json").read_bytes(), media_type="application/json",
                        headers={"request-id": "req_up_msg"})  # fmt: skip

    async def count_tokens(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"input_tokens": 14})


class GatewayServer:
    """The gateway app behind uvicorn in a thread: real HTTP, so streaming and disconnects are real."""

    def __init__(self, settings: Any):
        from ingest_gateway.app import create_app

        self.port = settings.gateway.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="gateway", daemon=True)

    def __enter__(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
