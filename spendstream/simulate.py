"""`spendstream simulate`: realistic agent-fleet traffic against the gateway.

The truth of a run is what the gateway acknowledged: every event of a 202 response that was not
listed as rejected is written to ``--record`` (one JSON event per line, with its tenant key
index), so tests and benchmarks can compare ClickHouse against exactly the acknowledged events.
A request that fails (503/429/timeout) is retried with the SAME event ids, as real clients do,
which also exercises the pipeline's dedupe. Events carry their own timestamp (the time they were
generated), as agents' events do, so a recorded event can be priced again exactly.

Traffic shape: a steady ``rate`` with optional bursts (``burst_every`` seconds, ``burst_factor``
times the rate for ``burst_seconds``) and optionally one runaway agent sending half of it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import httpx
import orjson

#: (provider, model, reasoning model?) — every entry is priced by the genai-prices catalog
MODEL_MIX: tuple[tuple[str, str, bool, float], ...] = (
    ("openai", "gpt-4o", False, 0.18),
    ("openai", "gpt-4o-mini", False, 0.22),
    ("openai", "o3-mini", True, 0.06),
    ("openai", "gpt-4.1", False, 0.08),
    ("anthropic", "claude-sonnet-4-20250514", False, 0.14),
    ("anthropic", "claude-3-5-haiku-latest", False, 0.07),
    ("google", "gemini-2.5-flash", True, 0.10),
    ("google", "gemini-2.5-pro", True, 0.05),
    ("mistral", "mistral-large-latest", False, 0.03),
    ("deepseek", "deepseek-chat", False, 0.04),
    ("groq", "llama-3.3-70b-versatile", False, 0.03),
)
FOREVER_S = 1e12
OPERATIONS = ("chat", "plan", "tool_call", "summarise", "embed_query")


def now_rfc3339() -> str:
    """The current time as the gateway writes event times: UTC, milliseconds, ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Fleet:
    """Shape of the simulated fleet. Deterministic for a given seed."""

    projects: int = 3
    agents: int = 10
    users: int = 20
    runaway: bool = False
    seed: int = 7
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._models = [m[:3] for m in MODEL_MIX]
        self._weights = [m[3] for m in MODEL_MIX]

    def event(self) -> dict[str, Any]:
        r = self.rng
        agent_idx = r.randrange(self.agents)
        if self.runaway and r.random() < 0.5:
            agent_idx = 0  # the runaway agent sends about half of all traffic
        provider, model, reasoning = r.choices(self._models, self._weights)[0]
        input_tokens = int(r.lognormvariate(7.0, 1.0)) + 1
        output_tokens = int(r.lognormvariate(5.5, 0.9)) + 1
        ev: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=r.getrandbits(128), version=4)),
            "timestamp": now_rfc3339(),
            "project": f"project-{agent_idx % self.projects}",
            "agent": "runaway-agent" if (self.runaway and agent_idx == 0) else f"agent-{agent_idx}",
            "user": f"user-{r.randrange(self.users)}",
            "session_id": f"s-{r.randrange(1000)}",
            "operation": r.choice(OPERATIONS),
            "provider": provider,
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "latency_ms": int(r.lognormvariate(6.5, 0.6)),
            "status": "error" if r.random() < 0.02 else "ok",
            "tags": {"env": r.choice(("prod", "staging")), "team": f"team-{agent_idx % 4}"},
        }
        if r.random() < 0.4:
            ev["cache_read_tokens"] = r.randrange(input_tokens + 1)
        if reasoning:
            ev["reasoning_tokens"] = r.randrange(output_tokens + 1)
        return ev

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        while True:
            yield [self.event() for _ in range(size)]


@dataclass
class Counters:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    retried_requests: int = 0
    failed_requests: int = 0


#: ``on_answer(status, monotonic time)`` is told of every answer; status 0 = no HTTP answer
AnswerHook = Callable[[int, float], None]


async def _post_until_answered(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    batch: list[dict[str, Any]],
    counters: Counters,
    deadline: float,
    on_answer: AnswerHook | None = None,
) -> dict[str, Any] | None:
    """POST one batch; on 429/503/transport errors retry the same body until the deadline."""
    body = orjson.dumps(batch if len(batch) > 1 else batch[0])
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    delay = 0.05
    while True:
        try:
            resp = await client.post(url, content=body, headers=headers)
            if on_answer is not None:
                on_answer(resp.status_code, time.monotonic())
            if resp.status_code in (202, 400):
                return resp.json()
            if resp.status_code not in (429, 503):
                raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:300]}")
            delay = min(float(resp.headers.get("Retry-After", delay)), 2.0)
        except httpx.TransportError:
            if on_answer is not None:
                on_answer(0, time.monotonic())
        if time.monotonic() > deadline:
            counters.failed_requests += 1
            return None
        counters.retried_requests += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


@dataclass(frozen=True)
class Bursts:
    """Every ``every`` seconds the rate is ``factor`` times higher for ``seconds`` seconds."""

    every: float
    seconds: float = 2.0
    factor: float = 4.0

    def rate_at(self, base: float, elapsed: float) -> float:
        return base * self.factor if elapsed % self.every < self.seconds else base


async def run(
    gateway_url: str,
    api_keys: list[str],
    *,
    rate: float,
    duration: float,
    events: int,
    batch: int,
    fleet: Fleet,
    record: IO[bytes] | None = None,
    concurrency: int = 16,
    progress: bool = True,
    retry_horizon_s: float = 120.0,
    bursts: Bursts | None = None,
    on_answer: AnswerHook | None = None,
) -> Counters:
    """Send traffic; returns the counters. Stops at ``events`` sent or after ``duration`` seconds.

    ``rate`` 0 sends as fast as ``concurrency`` requests in flight allow. Every request is
    retried (same event ids) until answered or ``retry_horizon_s`` passed; ``on_answer`` sees
    every answer, retries included."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not events and not duration:
        raise ValueError("give --events or --duration")
    counters = Counters()
    url = gateway_url.rstrip("/") + "/v1/events"
    start = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    gen = fleet.batches(batch)
    tasks: set[asyncio.Task] = set()

    async def send(key_idx: int, items: list[dict[str, Any]]) -> None:
        try:
            answer = await _post_until_answered(
                client, url, api_keys[key_idx], items, counters, time.monotonic() + retry_horizon_s, on_answer
            )
            if answer is None:
                return
            rejected = {r["index"] for r in answer.get("rejected", [])}
            counters.rejected += len(rejected)
            counters.accepted += len(items) - len(rejected)
            if record is not None:
                for i, ev in enumerate(items):
                    if i not in rejected:
                        record.write(orjson.dumps({"tenant_key": key_idx, **ev}) + b"\n")
        finally:
            sem.release()

    bar = Progress(
        TextColumn("[bold]simulate"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    )
    total = events or (int(rate * duration) if rate and duration < FOREVER_S else None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    due = start  # when the next request is due (pacing by schedule, so slow answers don't lower the rate)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        with bar:
            task_id = bar.add_task("send", total=total, stats="")
            while True:
                elapsed = time.monotonic() - start
                if (events and counters.sent >= events) or (duration and elapsed >= duration):
                    break
                n = min(batch, events - counters.sent) if events else batch
                if rate:
                    current = bursts.rate_at(rate, due - start) if bursts else rate
                    due += n / current
                    if due > time.monotonic():
                        await asyncio.sleep(due - time.monotonic())
                items = next(gen)[:n]
                await sem.acquire()
                counters.sent += n
                t = asyncio.create_task(send(fleet.rng.randrange(len(api_keys)), items))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                bar.update(task_id, completed=counters.sent, stats=_stats(counters, elapsed))
            if tasks:
                await asyncio.gather(*tasks)
            bar.update(task_id, completed=counters.sent, stats=_stats(counters, time.monotonic() - start))
    return counters


def _stats(c: Counters, elapsed: float) -> str:
    rate = c.accepted / elapsed if elapsed > 0 else 0.0
    return f"accepted {c.accepted:,}  rejected {c.rejected:,}  retries {c.retried_requests:,}  {rate:,.0f} ev/s"


def run_cli(
    *,
    rate: float,
    duration: float,
    events: int,
    batch: int,
    tenants: int,
    projects: int,
    agents: int,
    users: int,
    runaway: bool,
    record: str | None,
    gateway_url: str | None,
    api_key: str | None,
    progress: bool = True,
    seed: int = 7,
    burst_every: float = 0.0,
) -> int:
    import sys

    if not gateway_url or not api_key:
        print(
            "simulate needs --gateway-url and --api-key (or SPENDSTREAM_GATEWAY_URL / SPENDSTREAM_API_KEY, "
            "e.g. `set -a; . .spendstream/dev.env`)",
            file=sys.stderr,
        )
        return 2
    keys = [k for k in api_key.split(",") if k]
    if tenants != len(keys):
        print(
            f"--tenants {tenants} needs that many comma-separated API keys (one per tenant); got {len(keys)}",
            file=sys.stderr,
        )
        return 2
    if not events and not duration:
        duration = FOREVER_S  # `spendstream dev --demo`: run until stopped
    fleet = Fleet(projects=projects, agents=agents, users=users, runaway=runaway, seed=seed)
    out = open(record, "ab") if record else None
    try:
        counters = asyncio.run(
            run(
                gateway_url,
                keys,
                rate=rate,
                duration=duration,
                events=events,
                batch=batch,
                fleet=fleet,
                record=out,
                progress=progress,
                bursts=Bursts(burst_every) if burst_every else None,
            )
        )
    except KeyboardInterrupt:
        return 130
    finally:
        if out:
            out.close()
    print(
        f"sent {counters.sent}, accepted {counters.accepted}, rejected {counters.rejected}, "
        f"failed requests {counters.failed_requests}"
    )
    return 0 if counters.failed_requests == 0 else 1
