"""A local fake of OpenAI's and Anthropic's admin usage/cost APIs over real HTTP, serving the
providers' documented shapes (WIRE-CONTRACTS.md section 3; recorded examples in
tests/fixtures/provider_reports.json): every bucket of the asked span in order (empty ``results``
where nothing was used), pages of at most ``limit`` (and ``page_size``) buckets with an opaque
``next_page`` while ``has_more``, the providers' auth headers, 429 with ``retry-after`` on demand,
and failures on demand.

Data is held in each provider's native result shape per bucket start; tests change it between
runs to play a provider revising a recent bucket.

    with FakeProviders(openai_key="sk-admin-...", anthropic_key="sk-ant-admin-...") as fake:
        fake.data["anthropic", "costs"][day_start] = [anthropic_cost("claude-...", "123.45")]
        fake.base_url("anthropic")  # -> http://127.0.0.1:PORT/anthropic
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ROUTES = {
    "/openai/v1/organization/usage/completions": ("openai", "usage", 3600, 168),
    "/openai/v1/organization/costs": ("openai", "costs", 86400, 180),
    "/anthropic/v1/organizations/usage_report/messages": ("anthropic", "usage", 3600, 168),
    "/anthropic/v1/organizations/cost_report": ("anthropic", "costs", 86400, 31),
}


def openai_usage(model, project, key, *, input_tokens, cached=0, output_tokens, requests=1, audio_in=0, audio_out=0):
    return {
        "object": "organization.usage.completions.result", "input_tokens": input_tokens,
        "output_tokens": output_tokens, "input_cached_tokens": cached, "input_cache_write_tokens": 0,
        "input_uncached_tokens": input_tokens - cached, "input_audio_tokens": audio_in,
        "output_audio_tokens": audio_out, "num_model_requests": requests, "project_id": project,
        "user_id": None, "api_key_id": key, "model": model, "batch": None, "service_tier": None,
    }  # fmt: skip


def openai_cost(line_item, project, value: float):
    return {"object": "organization.costs.result", "amount": {"value": value, "currency": "usd"},
            "line_item": line_item, "project_id": project}  # fmt: skip


def anthropic_usage(model, workspace, key, *, uncached, read=0, write_5m=0, write_1h=0, output_tokens, searches=0):
    return {
        "uncached_input_tokens": uncached,
        "cache_creation": {"ephemeral_1h_input_tokens": write_1h, "ephemeral_5m_input_tokens": write_5m},
        "cache_read_input_tokens": read, "output_tokens": output_tokens,
        "server_tool_use": {"web_search_requests": searches}, "api_key_id": key, "workspace_id": workspace,
        "model": model, "service_tier": "standard", "context_window": "0-200k",
    }  # fmt: skip


def anthropic_cost(model, cents: str, workspace=None, token_type="uncached_input_tokens"):
    return {"currency": "USD", "amount": cents, "workspace_id": workspace,
            "description": f"{model} Usage - {token_type}", "cost_type": "tokens", "context_window": "0-200k",
            "model": model, "service_tier": "standard", "token_type": token_type}  # fmt: skip


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeProviders:
    def __init__(self, *, openai_key: str, anthropic_key: str, page_size: int = 1000):
        self.keys = {"openai": openai_key, "anthropic": anthropic_key}
        self.page_size = page_size
        #: (provider, dataset) -> bucket start (unix s) -> native results
        self.data: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = defaultdict(dict)
        self.throttle: list[tuple[str, str]] = []  # (provider/dataset, retry-after) answered 429 once each
        self.failing: set[str] = set()  # "provider/dataset" answered 500 while listed
        self.delay_s = 0.0
        self.log: list[dict[str, Any]] = []  # every request: time, path, params, status
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                status, headers, body = fake.answer(self.path, self.headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                data = json.dumps(body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeProviders:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def base_url(self, provider: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{provider}" + ("/v1" if provider == "openai" else "")

    def requests(self, provider: str, dataset: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["route"] == f"{provider}/{dataset}"]

    def answer(self, raw_path: str, headers: Any) -> tuple[int, dict[str, str], Any]:
        url = urlsplit(raw_path)
        params = parse_qsl(url.query, keep_blank_values=True)
        route = ROUTES.get(url.path)
        if route is None:
            return 404, {}, {"error": {"type": "not_found_error", "message": url.path}}
        provider, dataset, width, max_limit = route
        name = f"{provider}/{dataset}"
        entry = {"at": time.monotonic(), "route": name, "params": params, "status": 200}
        with self._lock:
            self.log.append(entry)
            throttled = next((t for t in self.throttle if t[0] == name), None)
            if throttled:
                self.throttle.remove(throttled)
        if self.delay_s:
            time.sleep(self.delay_s)
        if provider == "openai":
            ok = headers.get("authorization") == f"Bearer {self.keys['openai']}"
        else:
            ok = headers.get("x-api-key") == self.keys["anthropic"] and bool(headers.get("anthropic-version"))
        if not ok:
            entry["status"] = 401
            return 401, {}, {"error": {"type": "authentication_error", "message": "invalid admin key"}}
        if throttled:
            entry["status"] = 429
            return 429, {"retry-after": throttled[1]}, {"error": {"type": "rate_limit_error", "message": "slow down"}}
        if name in self.failing:
            entry["status"] = 500
            return 500, {}, {"error": {"type": "api_error", "message": "internal"}}
        query = dict(params)
        expected_width = "1h" if width == 3600 else "1d"
        limit = int(query.get("limit", 7))
        if query.get("bucket_width") != expected_width or not 1 <= limit <= max_limit:
            entry["status"] = 400
            return 400, {}, {"error": {"type": "invalid_request_error", "message": "bucket_width/limit"}}
        if provider == "openai":
            start, end = int(query["start_time"]), int(query["end_time"])
        else:
            start, end = _epoch(query["starting_at"]), _epoch(query["ending_at"])
        start -= start % width
        if "page" in query:
            start = int(base64.urlsafe_b64decode(query["page"].removeprefix("page_")).decode())
        size = min(limit, self.page_size)
        starts = list(range(start, end, width))
        shown, rest = starts[:size], starts[size:]
        store = self.data[provider, dataset]
        if provider == "openai":
            data = [
                {"object": "bucket", "start_time": s, "end_time": s + width, "results": store.get(s, [])} for s in shown
            ]
        else:
            data = [{"starting_at": _rfc3339(s), "ending_at": _rfc3339(s + width), "results": store.get(s, [])}
                    for s in shown]  # fmt: skip
        next_page = "page_" + base64.urlsafe_b64encode(str(rest[0]).encode()).decode() if rest else None
        body = {"data": data, "has_more": bool(rest), "next_page": next_page}
        if provider == "openai":
            body = {"object": "page", **body}
        return 200, {}, body
