"""Test support for the query API: a migrated database, known usage rows, and a running server.

``QueryApiServer`` serves ``create_app(settings)`` with uvicorn in a thread (real HTTP, real
lifespan); ``spawn_query_api`` runs ``spendstream query-api`` as a child process for tests that
measure the server's memory. ``seed_events`` writes rows straight into ``usage_events`` (the
materialized views fill the aggregates) and returns them for independent computations.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import uvicorn

from query_api.app import create_app
from spendstream.clickhouse import get_client
from spendstream.devstack import child_env
from spendstream.keys import create_key
from spendstream.migrate import apply_migrations
from spendstream.settings import Settings

UTC = UTC
TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
)
COST_PARTS = ("input", "output", "cache_read", "cache_write", "reasoning", "input_audio", "output_audio", "request")
EVENT_COLUMNS = (
    "tenant",
    "project",
    "agent",
    "user",
    "session_id",
    "operation",
    "tags",
    "provider",
    "model",
    *TOKEN_COLUMNS,
    "cost_nanos",
    *[f"cost_{p}_nanos" for p in COST_PARTS],
    "price_id",
    "pricing_status",
    "price_source",
    "status",
    "latency_ms",
    "event_id",
    "timestamp",
    "received_at",
    "partition",
    "offset",
    "src_partition",
    "src_offset",
)


def migrate(settings: Settings) -> None:
    client = get_client(settings, database="default")
    try:
        apply_migrations(client, settings, echo=lambda _: None)
    finally:
        client.close()


def make_events(
    tenant: str, n: int, start: datetime, end: datetime, *, seed: int, prefix: str | None = None
) -> list[dict[str, Any]]:
    """``n`` events of ``tenant`` with millisecond timestamps spread over [start, end)."""
    rng = random.Random(seed)
    span_ms = int((end - start).total_seconds() * 1000)
    prefix = prefix or tenant
    events = []
    for i in range(n):
        parts = {p: rng.randrange(0, 3_000_000) for p in COST_PARTS}
        tokens = {c: rng.randrange(0, 5_000) for c in TOKEN_COLUMNS}
        unknown = rng.random() < 0.05
        if unknown:
            parts = dict.fromkeys(COST_PARTS, 0)
        tags = {}
        if rng.random() < 0.7:
            tags["env"] = rng.choice(["prod", "staging"])
        if rng.random() < 0.4:
            tags["team"] = rng.choice(["search", "billing", "ops"])
        events.append(
            {
                "tenant": tenant,
                "project": f"{prefix}-proj-{rng.randrange(3)}",
                "agent": f"{prefix}-agent-{rng.randrange(5)}",
                "user": rng.choice(["", f"{prefix}-user-1", f"{prefix}-user-2", f"{prefix}-user-3"]),
                "session_id": f"s{rng.randrange(20)}",
                "operation": "chat",
                "tags": tags,
                "provider": rng.choice(["openai", "anthropic", "google"]),
                "model": "mystery-model" if unknown else rng.choice(["m-small", "m-large"]),
                **tokens,
                "cost_nanos": sum(parts.values()),
                **{f"cost_{p}_nanos": v for p, v in parts.items()},
                "price_id": "" if unknown else "catalog:x",
                "pricing_status": "unknown_model" if unknown else "priced",
                "price_source": "none" if unknown else "catalog",
                "status": "error" if rng.random() < 0.1 else "ok",
                "latency_ms": None if rng.random() < 0.2 else rng.randrange(50, 5_000),
                "event_id": f"{prefix}-ev-{seed}-{i:06d}",
                "timestamp": start + timedelta(milliseconds=rng.randrange(span_ms)),
                "received_at": end,
                "partition": 0,
                "offset": i,
                "src_partition": 0,
                "src_offset": i,
            }
        )
    return events


def insert_events(settings: Settings, events: list[dict[str, Any]]) -> None:
    client = get_client(settings)
    try:
        client.insert("usage_events", [[e[c] for c in EVENT_COLUMNS] for e in events], column_names=list(EVENT_COLUMNS))
    finally:
        client.close()


def _wait_ready(url: str, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("query API exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"query API at {url} not ready after {timeout} s")


class QueryApiServer:
    """``create_app(settings)`` behind uvicorn in a background thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.query_api.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.query_api.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="query-api", daemon=True)

    def __enter__(self) -> QueryApiServer:
        self._thread.start()
        _wait_ready(self.url, 30.0, self._thread.is_alive)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)


def spawn_query_api(settings: Settings, log_path: str) -> subprocess.Popen:
    """``spendstream query-api`` as a child process (its own memory, measurable from outside)."""
    env = {**os.environ, **child_env(settings)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "query-api"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_ready(f"http://127.0.0.1:{settings.query_api.port}", 60.0, lambda: proc.poll() is None)
    return proc


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def admin_and_reader(settings: Settings, admin_key: str, tenant: str) -> Iterator[tuple[QueryApiServer, Any, Any]]:
    """A running query API and two clients of ``tenant``: its admin key and a new read-only key."""
    client = get_client(settings)
    try:
        _, read_key = create_key(client, tenant, ["read"], "reader")
    finally:
        client.close()
    with QueryApiServer(settings) as server:
        with server.client(admin_key) as admin, server.client(read_key) as reader:
            yield server, admin, reader
