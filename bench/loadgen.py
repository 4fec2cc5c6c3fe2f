"""A light HTTP/1.1 load generator for latency benchmarks: it measures the server, not itself.

bench_proxy runs its calls through generator processes of this module, the same way for the
direct and the proxied rounds:

- its own processes (``Generators``; uvloop), so the bench's own work (the other side's
  processes, result handling) is not in any call's time;
- one keep-alive connection per call in flight, opened before the round starts: no call waits
  for a pooled connection, and no connection is set up inside a timed call;
- every request's bytes built before the round; a call's time starts right before its bytes are
  written to the socket and ends in the protocol callback that receives the response's last byte
  (``_Response``: just enough HTTP/1.1 for the servers measured, Content-Length and chunked
  bodies), with no task resumed or scheduled in between; for time to first byte it ends at the
  response's first body byte;
- the cyclic garbage collector off during a round (and the objects made at start frozen), so no
  collection pause lands in a call.

Protocol between the bench and a generator (JSON lines on stdin / stdout): the bench sends a
round ``{"host", "port", "requests": [[index, request bytes as latin-1], ...], "concurrency",
"first_byte", "starts"}`` (``starts``: when each connection makes its first call, seconds
after the round starts); the generator opens its connections and answers ``{"ready": true}``; the bench
sends ``{"go": true}`` to every generator at once; each answers ``{"times": [[index, seconds,
status, started (seconds into the round)], ...]}``. An empty line ends the process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any


def request_bytes(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Response:
    """An HTTP/1.1 response read as its bytes arrive: the status, when its body's first byte
    came (``body_started``) and when it ended (``complete``). Content-Length and chunked bodies
    (what uvicorn sends); one response at a time per connection."""

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.state = "head"  # head, data (length), size, chunk, chunk_end, trailer, done
        self.remaining = 0
        self.body_started = False

    @property
    def complete(self) -> bool:
        return self.state == "done"

    def feed(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while buf and self.state != "done":
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                lines = buf[:end].decode("latin-1").split("\r\n")
                buf = buf[end + 4 :]
                self.status = int(lines[0].split(" ", 2)[1])
                fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if fields.get("transfer-encoding", "").lower() == "chunked":
                    self.state = "size"
                else:
                    self.remaining = int(fields.get("content-length", "0"))
                    self.state = "data" if self.remaining else "done"
            elif self.state in ("data", "chunk"):
                taken = min(len(buf), self.remaining)
                self.body_started = True
                self.remaining -= taken
                buf = buf[taken:]
                if not self.remaining:
                    self.state = "done" if self.state == "data" else "chunk_end"
            elif self.state in ("size", "chunk_end", "trailer"):
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2 :]
                if self.state == "chunk_end":
                    self.state = "size"
                elif self.state == "trailer":
                    self.state = "done" if not line else "trailer"
                else:
                    self.remaining = int(line.split(b";", 1)[0], 16)
                    self.state = "chunk" if self.remaining else "trailer"
        self.buf = buf


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one call at a time, timed inside the protocol callbacks."""

    def __init__(self, first_byte: bool):
        self.first_byte = first_byte
        self.response = _Response()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.ended = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        response = self.response
        response.feed(data)
        if not self.ended and (response.complete or (self.first_byte and response.body_started)):
            self.ended = now  # when these bytes arrived
        if response.complete and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc!r}"))

    async def call(self, request: bytes) -> tuple[float, float, int]:
        """(started, seconds, status)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.ended = 0.0
        self.response = _Response()
        started = time.perf_counter()
        self.transport.write(request)
        await self.waiter
        return started, self.ended - started, self.response.status


async def _round(command: dict[str, Any], read_line: Any) -> list[list[Any]]:
    loop = asyncio.get_running_loop()
    requests = [(index, raw.encode("latin-1")) for index, raw in command["requests"]]
    connections = []
    for _ in range(min(command["concurrency"], len(requests))):
        _, conn = await loop.create_connection(
            lambda: _Connection(command["first_byte"]), command["host"], command["port"]
        )
        connections.append(conn)
    print(json.dumps({"ready": True}), flush=True)
    await read_line()  # "go": every generator starts at once
    times: list[list[Any]] = []
    work: Iterator[tuple[int, bytes]] = iter(requests)
    round_started = time.perf_counter()

    async def run(conn: _Connection, start_after: float) -> None:
        if start_after:
            await asyncio.sleep(start_after)
        for index, request in work:
            started, elapsed, status = await conn.call(request)
            times.append([index, elapsed, status, started - round_started])

    gc.disable()
    try:
        starts = command.get("starts") or [0.0] * len(connections)
        await asyncio.gather(*(run(conn, start) for conn, start in zip(connections, starts, strict=False)))
    finally:
        gc.enable()
        for conn in connections:
            if conn.transport is not None:
                conn.transport.close()
    return times


async def _serve() -> None:
    loop = asyncio.get_running_loop()

    async def read_line() -> str:
        return await loop.run_in_executor(None, sys.stdin.readline)

    gc.collect()
    gc.freeze()
    while True:
        line = (await read_line()).strip()
        if not line:
            return
        times = await _round(json.loads(line), read_line)
        print(json.dumps({"times": times}), flush=True)
        gc.collect()


class Generators:
    """``n`` generator processes (``python -m bench.loadgen``); ``run`` splits a round among them."""

    def __init__(self, n: int):
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for _ in range(n)
        ]

    def run(
        self,
        host: str,
        port: int,
        requests: list[tuple[int, bytes]],
        concurrency: int,
        first_byte: bool = False,
        ramp_s: float = 0.0,
    ) -> list[tuple[int, float, int, float]]:
        """Every request, ``concurrency`` in flight over all generators: (index, seconds, status,
        started: seconds into the round).

        ``ramp_s``: the calls in flight start one after another over this time (evenly), not all
        at once: with calls of about that length, the round is in its steady state from its start
        instead of opening with a burst of ``concurrency`` simultaneous calls that queue."""  # fmt: skip
        procs = self.procs[: max(1, min(len(self.procs), concurrency))]
        n = len(procs)
        for i, proc in enumerate(procs):
            share = [[index, raw.decode("latin-1")] for index, raw in requests[i::n]]
            slots = concurrency // n + (1 if i < concurrency % n else 0)
            command = {
                "host": host, "port": port, "requests": share, "first_byte": first_byte, "concurrency": slots,
                # slot j of generator i is slot j * n + i of all: the generators' starts interleave
                "starts": [(j * n + i) / concurrency * ramp_s for j in range(slots)],
            }  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()).get("ready"), "a generator did not get ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"go": True}) + "\n")
            proc.stdin.flush()
        out: list[tuple[int, float, int, float]] = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("a load generator died (see its stderr above)")
            out += [tuple(t) for t in json.loads(line)["times"]]  # type: ignore[misc]
        return out

    def close(self) -> None:
        for proc in self.procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
                proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve())
