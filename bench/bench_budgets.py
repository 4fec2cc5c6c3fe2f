"""Budgets: the gateway's budget check latency and CPU, and alert latency to a webhook.

    .venv/bin/python -m bench.bench_budgets [--checks 2000] [--budgets 20] [--interval 0.1]
                                            [--background-rate 1000] [--write-results]

The whole embedded stack as `spendstream dev` runs it (``spendstream.devstack.Stack``, product
defaults); budgets are created through the query API before the stages start. The tenant has
40 per-agent budgets (daily / rolling_1h / total windows, half enforced), 10 per-project monthly
budgets and one tenant-wide budget, so every checked scope is covered by three budgets, plus
the crossing budgets of bench_alerts (``--budgets`` per phase).

1. Budget check: ``POST /v1/budgets/check`` one request at a time over one keep-alive
   connection, from a minimal HTTP/1.1 client (a raw socket: httpx alone costs about a
   millisecond of this process's CPU per request, which would be measured as latency);
   latency = request written -> whole response read, in this process. The gateway's CPU per
   check comes from /proc: user + system of its process over the run, less its rate over the
   2 s before without checks, per check.
2. Alert latency: bench_alerts' method (crossing event's 202 -> the signed webhook receives the
   alert, same clock), ``--budgets`` budgets with three crossings each.

Both run idle, then while a separate process ingests ``--background-rate`` events/s (50-event
requests on projects without budgets, open loop). ``--write-results`` replaces the "Budgets"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.stage_bench import ROOT, cpu_seconds, machine, replace_section

sys.path.insert(0, str(ROOT / "tests" / "integration"))

import httpx  # noqa: E402
import orjson  # noqa: E402
from notify_support import Receiver  # noqa: E402

from bench.bench_alerts import background, create_budgets, phase  # noqa: E402
from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings  # noqa: E402

CHECK_TARGET_P99_MS = 5.0
ALERT_TARGET_P99_S = 1.0
WINDOWS = ("daily", "rolling_1h", "total")
AGENTS = 40
PROJECTS = 10
#: processes on an alert's path whose CPU is reported per alert phase
CPU_OF = ("gateway", "pricing", "budgets", "notify")
#: seconds the gateway's CPU is sampled without checks, before each check phase
BASELINE_S = 2.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[round(p / 100 * (len(ordered) - 1))]


async def create_check_budgets(api: httpx.AsyncClient) -> None:
    """Three budgets cover each (project, agent) checked: the agent's, the project's, the tenant's."""
    bodies = [{"name": f"agent {i}", "scope": {"project": f"proj-{i % PROJECTS}", "agent": f"agent-{i}"},
               "window": WINDOWS[i % 3], "timezone": "Europe/Berlin", "limit_usd": "50.00", "forecast": True,
               "enforce": i % 2 == 0} for i in range(AGENTS)]  # fmt: skip
    bodies += [{"name": f"project {p}", "scope": {"project": f"proj-{p}"}, "window": "monthly",
                "timezone": "America/New_York", "limit_usd": "500.00"} for p in range(PROJECTS)]  # fmt: skip
    bodies.append({"name": "everything", "scope": {}, "window": "total", "limit_usd": "1000000.00"})
    for body in bodies:
        (await api.post("/v1/budgets", json=body)).raise_for_status()


class CheckClient:
    """One keep-alive HTTP/1.1 connection sending budget checks (see the module doc for why raw)."""

    def __init__(self, host: str, port: int, api_key: str):
        self.host, self.port = host, port
        self.head = (f"POST /v1/budgets/check HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
                     "Content-Type: application/json\r\n").encode()  # fmt: skip
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> CheckClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()
        await self.writer.wait_closed()

    async def check(self, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        return status, await self.reader.readexactly(length)


def check_body(i: int) -> bytes:
    agent = i % AGENTS
    return orjson.dumps({"scope": {"project": f"proj-{agent % PROJECTS}", "agent": f"agent-{agent}"},
                         "estimated_cost_usd": "0.05"})  # fmt: skip


async def wait_view_ready(client: CheckClient, timeout: float = 90.0) -> None:
    """The gateway's view has loaded every budget (three match) and read budget.state."""
    deadline = time.monotonic() + timeout
    while True:
        async with client:
            status, body = await client.check(check_body(AGENTS - 1))
        if status == 200 and len(orjson.loads(body)["budgets"]) == 3:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"budget check not ready after {timeout:.0f} s: {status} {body[:300]!r}")
        await asyncio.sleep(0.2)


async def measure_checks(client: CheckClient, n: int, gateway_pid: int) -> dict:
    # a connection of its own: the server closes idle keep-alive connections after a few seconds
    async with client:
        for i in range(200):  # warm-up
            await client.check(check_body(i))
        # the gateway's CPU without checks (background tasks, ingest under load), subtracted below
        quiet_start, quiet_cpu = time.monotonic(), cpu_seconds(gateway_pid)
        await asyncio.sleep(BASELINE_S)
        base_rate = (cpu_seconds(gateway_pid) - quiet_cpu) / (time.monotonic() - quiet_start)
        latencies = []
        started_at, cpu_before = time.monotonic(), cpu_seconds(gateway_pid)
        for i in range(n):
            body = check_body(i)
            started = time.perf_counter()
            status, answer = await client.check(body)
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200 or len(orjson.loads(answer)["budgets"]) != 3:
                raise SystemExit(f"budget check answered {status}: {answer[:300]!r}")
    cpu_us = (cpu_seconds(gateway_pid) - cpu_before - base_rate * (time.monotonic() - started_at)) / n * 1e6
    return {"n": n, "p50": statistics.median(latencies), "p99": percentile(latencies, 99), "max": max(latencies),
            "gateway_cpu_us": cpu_us}  # fmt: skip


def _load_process(gateway_url: str, api_key: str, rate: float, stop: multiprocessing.synchronize.Event) -> None:
    """bench_alerts' background traffic, from a process of its own (not this one's event loop)."""

    async def run() -> None:
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway_url, headers={"Authorization": f"Bearer {api_key}"},
                                     timeout=30) as gateway:  # fmt: skip
            load = asyncio.create_task(background(gateway, rate, done))
            await asyncio.to_thread(stop.wait)
            done.set()
            await load

    asyncio.run(run())


async def alerts_with_cpu(stack: Stack, *phase_args: object) -> dict:
    """bench_alerts' phase, plus the CPU seconds each stage on the alert path used meanwhile."""
    pids = {name: stack.pid(name) for name in CPU_OF}
    before = {name: cpu_seconds(pid) for name, pid in pids.items() if pid}
    result = await phase(*phase_args)
    result["cpu_s"] = {name: cpu_seconds(pids[name]) - cpu for name, cpu in before.items()}
    return result


async def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="spendstream-bench-budgets-") as tmp:
        work = Path(tmp)
        settings = local_settings(work)  # env=dev: the loopback receiver is allowed
        stack = Stack(settings, work / "stack")
        api_key = settings.bootstrap_admin_key.get_secret_value()
        auth = {"Authorization": f"Bearer {api_key}"}
        results: dict = {}
        async with Receiver() as receiver:
            try:
                for name in (*INFRASTRUCTURE, "query-api"):
                    await asyncio.to_thread(stack.start_component, name)
                async with httpx.AsyncClient(base_url=stack.query_url, headers=auth, timeout=30) as api:
                    await create_check_budgets(api)
                    created = await api.post("/v1/webhooks", json={"url": receiver.url("/alerts")})
                    created.raise_for_status()
                    webhook_id = created.json()["id"]
                    warmup = await create_budgets(api, webhook_id, ["warmup"])
                    crossing = {name: await create_budgets(api, webhook_id, [f"{name}-{i}" for i in range(args.budgets)])
                                for name in ("idle", "background")}  # fmt: skip
                for name in stack.names:
                    if name not in (*INFRASTRUCTURE, "query-api"):
                        await asyncio.to_thread(stack.start_component, name)
                gateway_pid = stack.pid("gateway")
                assert gateway_pid is not None
                checks = CheckClient("127.0.0.1", settings.gateway.port, api_key)
                async with httpx.AsyncClient(base_url=stack.gateway_url, headers=auth, timeout=30) as gateway:
                    await wait_view_ready(checks)
                    await phase(gateway, receiver, warmup, args.interval, 0)
                    results["checks_idle"] = await measure_checks(checks, args.checks, gateway_pid)
                    results["alerts_idle"] = await alerts_with_cpu(
                        stack, gateway, receiver, crossing["idle"], args.interval, 0
                    )
                    stop = multiprocessing.get_context("spawn").Event()
                    loader = multiprocessing.get_context("spawn").Process(
                        target=_load_process, args=(stack.gateway_url, api_key, args.background_rate, stop)
                    )
                    loader.start()
                    try:
                        await asyncio.sleep(2.0)  # the background traffic reaches its rate
                        results["checks_background"] = await measure_checks(checks, args.checks, gateway_pid)
                        results["alerts_background"] = await alerts_with_cpu(
                            stack, gateway, receiver, crossing["background"], args.interval, 0
                        )
                    finally:
                        stop.set()
                        loader.join(60)
                alerts = receiver.at("/alerts")
                results["duplicates"] = len(alerts) - len({r.json()["alert_id"] for r in alerts})
                results["load_average"] = os.getloadavg()
                return results
            finally:
                stack.stop()


def render(results: dict, args: argparse.Namespace) -> str:
    def check_row(label: str, r: dict) -> str:
        return (f"| {label} | {r['n']} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['max']:.2f} ms | "
                f"{r['gateway_cpu_us']:.0f} |")  # fmt: skip

    def alert_row(label: str, r: dict) -> str:
        cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r["cpu_s"].items())
        return (f"| {label} | {r['crossings']} | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
                f"{r['max'] * 1000:.0f} ms | {r['notify_p50'] * 1000:.0f} / {r['notify_p99'] * 1000:.0f} ms | "
                f"{cpu} |")  # fmt: skip

    check_p99 = max(results["checks_idle"]["p99"], results["checks_background"]["p99"])
    alert_p99 = max(results["alerts_idle"]["p99"], results["alerts_background"]["p99"])
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    loaded = f"while ingesting {args.background_rate:,.0f} events/s"
    return "\n".join([
        "## Budgets",
        "",
        "Budget check (`POST /v1/budgets/check`, three budgets match, answered from the gateway's in-memory "
        "view) and alert latency (crossing event's 202 -> signed generic webhook received). Whole embedded stack "
        "(`spendstream.devstack.Stack`, product defaults); see `bench/bench_budgets.py` for the method.",
        "",
        f"Command: `.venv/bin/python -m bench.bench_budgets --checks {args.checks} --budgets {args.budgets} "
        f"--interval {args.interval:g} --background-rate {args.background_rate:g}`",
        f"Machine: {machine()}; load average (1, 5, 15 min) at the end: {load}.",
        "",
        "| budget check | n | p50 | p99 | max | gateway CPU µs per check (above its rate without checks) |",
        "|---|---|---|---|---|---|",
        check_row("budget check, idle", results["checks_idle"]),
        check_row(f"budget check, {loaded}", results["checks_background"]),
        "",
        "| alert latency | crossings | p50 | p99 | max | of which notify p50 / p99 | CPU s during the phase |",
        "|---|---|---|---|---|---|---|",
        alert_row("alerts, idle", results["alerts_idle"]),
        alert_row(f"alerts, {loaded}", results["alerts_background"]),
        "",
        f"Targets: budget check p99 <= {CHECK_TARGET_P99_MS:g} ms: "
        f"{'met' if check_p99 <= CHECK_TARGET_P99_MS else 'NOT met'} ({check_p99:.2f} ms); alert latency p99 <= "
        f"{ALERT_TARGET_P99_S:g} s: {'met' if alert_p99 <= ALERT_TARGET_P99_S else 'NOT met'} ({alert_p99:.3f} s). "
        f"Every crossing's alert arrived; alerts received twice: {results['duplicates']}. Wall-clock figures "
        "depend on the shared box's load; the CPU column does not.",
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=2000, help="budget checks per phase")
    parser.add_argument("--budgets", type=int, default=20, help="crossing budgets per phase (3 crossings each)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between crossing events")
    parser.add_argument("--background-rate", type=float, default=1000.0, help="events/s in the second phase")
    parser.add_argument("--write-results", action="store_true", help='update the "Budgets" section of bench/RESULTS.md')
    args = parser.parse_args()
    report = render(asyncio.run(measure(args)), args)
    print(report)
    if args.write_results:
        replace_section("Budgets", report)
        print("updated bench/RESULTS.md")


if __name__ == "__main__":
    main()
