"""Load for the system benchmark: request bodies of realistic fleet events, cheap enough to make at
30k+ events/s inside the benchmark process, sent closed-loop with a bound on the pipeline backlog.

``spendstream.simulate`` is the realistic client (it records every acknowledged event, which
costs more CPU than the events themselves); here the events come from the same ``Fleet`` but are
serialised once as templates, and each request only splices in fresh event ids and the current
timestamp, so the load generator stays a small share of the 2 cores it shares with the stack.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

from spendstream.simulate import Fleet, now_rfc3339

_ID = "@@ID@@"
_TS = "@@TS@@"


class Bodies:
    """JSON-array bodies of ``batch`` events, every event id new, timestamps = now."""

    def __init__(self, batch: int, fleet: Fleet | None = None, templates: int = 4096):
        fleet = fleet or Fleet(projects=12, agents=60, users=400, seed=11)
        self.batch = batch
        self._parts: list[tuple[bytes, bytes, bytes]] = []
        for _ in range(templates):
            event = fleet.event()
            event["event_id"], event["timestamp"] = _ID, _TS
            head, rest = orjson.dumps(event).split(_ID.encode())
            mid, tail = rest.split(_TS.encode())
            self._parts.append((head, mid, tail))
        self._prefix = secrets.token_hex(4)
        self._next_id = 0
        self._cursor = 0

    def next(self) -> bytes:
        ts = now_rfc3339().encode()
        out: list[bytes] = [b"["]
        n = len(self._parts)
        for i in range(self.batch):
            head, mid, tail = self._parts[(self._cursor + i) % n]
            out += (head, f"{self._prefix}-{self._next_id + i:x}".encode(), mid, ts, tail, b",")
        out[-1] = b"]"
        self._cursor = (self._cursor + self.batch) % n
        self._next_id += self.batch
        return b"".join(out)


@dataclass
class LoadResult:
    accepted: int = 0
    requests: int = 0
    #: answers other than 202, by status (0 = transport error)
    errors: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)


async def closed_loop(
    url: str,
    key: str,
    bodies: Bodies,
    *,
    seconds: float,
    connections: int,
    backlog: Callable[[], int] | None = None,
    max_backlog: int = 0,
    result: LoadResult | None = None,
) -> LoadResult:
    """POST bodies on ``connections`` connections for ``seconds``; each connection sends its next
    request when the previous one is answered. With ``backlog`` (accepted but not yet stored) a
    sender waits while it is above ``max_backlog``: what the pipeline sustains, not what the
    gateway can queue, is then the offered rate. Counts go to ``result`` (live) if given."""
    result = result if result is not None else LoadResult()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def sender(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            if backlog is not None and backlog() > max_backlog:
                await asyncio.sleep(0.02)
                continue
            body = bodies.next()
            started = time.monotonic()
            try:
                resp = await client.post(url, content=body, headers=headers)
                status = resp.status_code
            except httpx.TransportError:
                status = 0
            result.requests += 1
            if status == 202:
                result.accepted += orjson.loads(resp.content)["accepted"]
                result.latencies_s.append(time.monotonic() - started)
            else:
                result.errors[status] = result.errors.get(status, 0) + 1
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        await asyncio.gather(*(sender(client) for _ in range(connections)))
    return result


async def paced(url: str, key: str, bodies: Bodies, *, seconds: float, events_per_s: float) -> LoadResult:
    """Open-loop load at a fixed rate (background traffic while latencies are measured)."""
    result = LoadResult()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    interval = bodies.batch / events_per_s
    start = time.monotonic()
    in_flight: set[asyncio.Task] = set()

    async def post(client: httpx.AsyncClient, body: bytes) -> None:
        try:
            resp = await client.post(url, content=body, headers=headers)
        except httpx.TransportError:
            result.errors[0] = result.errors.get(0, 0) + 1
            return
        result.requests += 1
        if resp.status_code == 202:
            result.accepted += orjson.loads(resp.content)["accepted"]
        else:
            result.errors[resp.status_code] = result.errors.get(resp.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=60.0) as client:
        n = 0
        while (due := start + n * interval) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(post(client, bodies.next()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            n += 1
        if in_flight:
            await asyncio.gather(*in_flight)
    return result
