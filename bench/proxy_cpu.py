"""The proxy's CPU per call, in one process: speed work on the proxy is judged by this.

    .venv/bin/python -m bench.proxy_cpu [--calls 3000] [--concurrency 20] [--stream] [--profile OUT]

The gateway's ``Proxy`` (the real one: its aiohttp upstream client, the recorder, the real
``Publisher`` on an embedded broker) serves ASGI calls made in this process, against the fake
OpenAI upstream of bench_proxy in its own process (uvicorn, uvloop). Passthrough auth with the
bootstrap key, a tenant without budgets: the path bench_proxy measures. The figure is this
process's CPU time (``time.process_time``) per call over ``--calls`` calls at ``--concurrency``
in flight, after a warm-up: it holds the proxy's work, its upstream client and publishing, and
the few µs of the ASGI stubs below, not the HTTP server in front of the gateway (uvicorn's
httptools, the same for any proxy code) nor the broker's or upstream's CPU (other processes). A
shared machine does not inflate CPU time the way it does latencies, so two versions of the proxy
compare by it (run each a few times, alternately). ``--stream`` measures streamed chat calls (the
include_usage rewrite, the SSE meter) instead; ``--profile OUT`` writes a cProfile of the
measured calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_proxy import ADMIN, BODY, DELAY_HEADER, model_times, wait_http  # noqa: E402
from spendstream.ports import free_port  # noqa: E402


async def run(args: argparse.Namespace, upstream_port: int, bootstrap: str, tmp: Path) -> dict[str, float]:
    from ingest_gateway.budget_view import BudgetView
    from ingest_gateway.metrics import GatewayMetrics
    from ingest_gateway.proxy.keys import ProviderKeyCache
    from ingest_gateway.proxy.metrics import ProxyMetrics
    from ingest_gateway.proxy.recorder import Recorder, Spool
    from ingest_gateway.proxy.service import Proxy
    from ingest_gateway.publisher import Publisher
    from spendstream.keys import KeyStore
    from spendstream.pricing.catalog import default_catalog
    from spendstream.settings import Settings

    settings = Settings(
        data_dir=str(tmp),
        bootstrap_admin_key=ADMIN,
        kafka={"bootstrap_servers": bootstrap, "profile": "embedded"},
        proxy={"openai_base_url": f"http://127.0.0.1:{upstream_port}/v1"},
    )
    metrics = GatewayMetrics()
    publisher = Publisher(settings, metrics)
    await publisher.start()
    budgets = BudgetView(settings)  # not started: no budgets (the bench tenant has none)
    budgets.budgets_loaded = True
    proxy_metrics = ProxyMetrics(metrics.registry)
    recorder = Recorder(publisher, Spool(tmp / "proxy-spool", 2**30), proxy_metrics)
    await recorder.start()
    proxy = Proxy(
        settings, KeyStore.from_settings(settings, None), budgets, ProviderKeyCache(settings), recorder,
        default_catalog(), proxy_metrics,
    )  # fmt: skip
    body = json.dumps({**BODY, "stream": True} if args.stream else BODY).encode()
    headers = [
        (b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"authorization", b"Bearer sk-bench"), (b"x-spendstream-key", ADMIN.encode()), (b"accept", b"*/*"),
        (b"user-agent", b"OpenAI/Python 2.8.0"), (b"x-stainless-lang", b"python"),
    ]  # fmt: skip
    scope = {
        "type": "http", "method": "POST", "path": "/proxy/openai/v1/chat/completions",
        "raw_path": b"/proxy/openai/v1/chat/completions", "query_string": b"", "headers": headers,
        "app": None,
    }  # fmt: skip
    request = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []
    first_bytes: list[float] = []  # from the call's start to its first body byte sent, upstream included
    delays = model_times(args.calls, args.upstream_ms)

    async def one(i: int = -1) -> None:
        sent = False
        started = time.perf_counter()
        first = 0.0
        finished = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return request
            await finished  # a stream's disconnect watch: no hang-up
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal first
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif not first and message.get("body"):
                first = time.perf_counter()
            elif not message.get("more_body") and not finished.done():
                finished.set_result(None)

        call_scope = dict(scope)
        if i >= 0 and delays[i]:  # the model time the fake upstream takes for this call
            call_scope["headers"] = [*headers, (DELAY_HEADER.encode(), str(delays[i]).encode())]
        await proxy.serve(call_scope, receive, send, "openai")
        if i >= 0:
            first_bytes.append(first - started)

    async def calls(n: int, timed: bool = False) -> None:
        work = iter(range(n))

        async def worker() -> None:
            for i in work:
                await one(i if timed else -1)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    await calls(200)  # warm up: connections, caches
    while recorder.pending:
        await asyncio.sleep(0.01)
    gc.collect()
    if args.freeze:  # as the gateway's server does after its start (ingest_gateway/main.py)
        gc.freeze()
    pauses: list[float] = []
    pause_started = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal pause_started
        if phase == "start":
            pause_started = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append(time.perf_counter() - pause_started)

    gc.callbacks.append(on_gc)
    lags: list[float] = []  # how late a 1 ms sleep wakes up: the event loop's stalls

    async def watch_loop() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    watcher = asyncio.ensure_future(watch_loop())
    profiler = cProfile.Profile() if args.profile else None
    statuses.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await calls(args.calls, timed=True)
    while recorder.pending:  # the calls' events acknowledged: publishing is part of a call
        await asyncio.sleep(0.001)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    watcher.cancel()
    lags.sort()
    gc.callbacks.remove(on_gc)
    gc.unfreeze()
    assert statuses == [200] * args.calls, sorted(set(statuses))
    published = proxy_metrics.published._value.get()
    await proxy.close()
    await recorder.close()
    await publisher.close()
    return {
        "cpu_us_per_call": cpu / args.calls * 1e6, "wall_s": wall, "published": published,
        "full_gc_pauses": len(pauses), "full_gc_max_ms": max(pauses, default=0) * 1000,
        "loop_lag_p99_ms": lags[int(0.99 * len(lags))] * 1000, "loop_lag_max_ms": lags[-1] * 1000,
        "first_byte_p50_ms": sorted(first_bytes)[len(first_bytes) // 2] * 1000,
        "first_byte_p99_ms": sorted(first_bytes)[int(0.99 * len(first_bytes))] * 1000,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="measurements in a row (one setup)")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--upstream-ms", type=int, default=0, help="mean model time per call (as bench_proxy)")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after the warm-up, as the gateway does")
    args = parser.parse_args(argv)
    import uvloop

    from spendstream.embedded.kafka import EmbeddedKafka

    tmp = Path(tempfile.mkdtemp(prefix="proxy-cpu-"))
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_proxy", "--upstream", str(port), "--upstream-ms", str(args.upstream_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    broker = EmbeddedKafka(log_path=tmp / "tansu.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        for _ in range(args.repeat):
            result = uvloop.run(run(args, port, broker.bootstrap, tmp))
            print(json.dumps({k: round(v, 3 if k.endswith("ms") else 1) for k, v in result.items()}), flush=True)
            gc.collect()
    finally:
        upstream.terminate()
        upstream.wait(10)
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
