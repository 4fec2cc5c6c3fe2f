"""Alert latency: the gateway's 202 for the event that crosses a budget threshold -> the webhook
receives the alert.

    .venv/bin/python -m bench.bench_alerts [--budgets 30] [--interval 0.1] [--background-rate 1000] [--write-results]

The whole embedded stack as `spendstream dev` runs it (``spendstream.devstack.Stack``: broker,
ClickHouse, gateway, pricing, budgets, notify, sink, query API; product defaults). A webhook
(generic, signed) receives on loopback in this process. Through the query API: one warm-up budget
and ``--budgets`` budgets per phase, each on a project of its own, window ``total``, limit
1.00 USD, thresholds 50/80/100 %, no forecast. The stages start after the budgets exist.

Each budget then gets three events (client-priced 0.50, 0.30 and 0.20 USD), each crossing one
threshold; events go out one at a time every ``--interval`` s, budgets interleaved. Latency of a
crossing = arrival of its alert at the receiver - the 202 of its event (both read from this
process's monotonic clock). Two phases: idle (crossings only), then with background traffic of
``--background-rate`` events/s (50-event requests on projects without budgets, open loop).

``--write-results`` replaces the "Alerts" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.stage_bench import ROOT, machine, replace_section

sys.path.insert(0, str(ROOT / "tests" / "integration"))

import httpx  # noqa: E402
from notify_support import Received, Receiver  # noqa: E402

from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings  # noqa: E402

TARGET_P99_S = 1.0
#: (threshold as the alert names it, event cost crossing it): 0.50 -> 50 %, +0.30 -> 80 %, +0.20 -> 100 %
STEPS = (("50", "0.50"), ("80", "0.30"), ("100", "0.20"))


def event(event_id: str, project: str, cost_usd: str) -> dict:
    return {"event_id": event_id, "project": project, "provider": "openai", "model": "gpt-4o",
            "input_tokens": 100, "output_tokens": 20, "cost_usd": cost_usd}  # fmt: skip


async def create_budgets(api: httpx.AsyncClient, webhook_id: str, names: list[str]) -> dict[str, str]:
    """project -> budget id."""
    ids = {}
    for project in names:
        response = await api.post("/v1/budgets", json={
            "name": project, "scope": {"project": project}, "window": "total", "limit_usd": "1.00",
            "thresholds": [50, 80, 100], "forecast": False, "channels": [webhook_id],
        })  # fmt: skip
        response.raise_for_status()
        ids[project] = response.json()["id"]
    return ids


async def background(gateway: httpx.AsyncClient, rate: float, stop: asyncio.Event) -> int:
    """Open loop: one 50-event request every 50/rate s until ``stop``; returns events accepted."""
    per_request, sent, n = 50, 0, 0
    start = time.monotonic()
    pending: set[asyncio.Task] = set()

    async def post(body: list[dict]) -> None:
        nonlocal sent
        response = await gateway.post("/v1/events", json=body)
        if response.status_code == 202:
            sent += len(body)

    while not stop.is_set():
        body = [event(f"bg-{n}-{j}", f"bg-{n % 10}", "0.000001") for j in range(per_request)]
        task = asyncio.create_task(post(body))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n * per_request / rate - time.monotonic()))
    await asyncio.gather(*pending)
    return sent


async def phase(
    gateway: httpx.AsyncClient, receiver: Receiver, budget_ids: dict[str, str], interval: float, rate: float
) -> dict:
    """Cross every threshold of every budget; latencies in seconds, per crossing."""
    accepted: dict[tuple[str, str], float] = {}
    stop = asyncio.Event()
    load = asyncio.create_task(background(gateway, rate, stop)) if rate else None
    if load:
        await asyncio.sleep(2.0)  # let the background traffic reach its rate before measuring
    start = time.monotonic()
    k = 0
    for threshold, cost in STEPS:
        for project, budget_id in budget_ids.items():
            response = await gateway.post("/v1/events", json=event(f"{project}-{threshold}", project, cost))
            response.raise_for_status()
            accepted[(budget_id, threshold)] = time.monotonic()
            k += 1
            await asyncio.sleep(max(0.0, start + k * interval - time.monotonic()))

    def arrivals() -> dict[tuple[str, str], Received]:
        out: dict[tuple[str, str], Received] = {}
        for r in receiver.at("/alerts"):
            body = r.json()
            out.setdefault((body["budget_id"], body["threshold"]), r)
        return out

    deadline = time.monotonic() + 60
    while not accepted.keys() <= arrivals().keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    background_events = await load if load else 0
    seen = arrivals()
    missing = accepted.keys() - seen.keys()
    if missing:
        raise SystemExit(f"{len(missing)} of {len(accepted)} alerts never arrived")
    # the notify stage's part: the budgets stage's created_at (wall clock) -> arrival (wall clock)
    notify = [seen[c].wall - datetime.fromisoformat(seen[c].json()["created_at"]).timestamp() for c in accepted]
    return {
        "crossings": len(accepted), "background_rate": rate, "background_events": background_events,
        **percentiles("", [seen[c].at - accepted[c] for c in accepted]), **percentiles("notify_", notify),
    }  # fmt: skip


def percentiles(prefix: str, values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"{prefix}p50": statistics.median(ordered), f"{prefix}p99": ordered[round(0.99 * (len(ordered) - 1))],
            f"{prefix}max": ordered[-1]}  # fmt: skip


async def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="spendstream-bench-alerts-") as tmp:
        work = Path(tmp)
        settings = local_settings(work)  # env=dev: the loopback receiver is allowed
        stack = Stack(settings, work / "stack")
        auth = {"Authorization": f"Bearer {settings.bootstrap_admin_key.get_secret_value()}"}
        async with Receiver() as receiver:
            try:
                for name in (*INFRASTRUCTURE, "query-api"):
                    await asyncio.to_thread(stack.start_component, name)
                async with httpx.AsyncClient(base_url=stack.query_url, headers=auth, timeout=30) as api:
                    created = await api.post("/v1/webhooks", json={"url": receiver.url("/alerts")})
                    created.raise_for_status()
                    webhook_id = created.json()["id"]
                    warmup = await create_budgets(api, webhook_id, ["warmup"])
                    idle = await create_budgets(api, webhook_id, [f"idle-{i}" for i in range(args.budgets)])
                    loaded = await create_budgets(api, webhook_id, [f"load-{i}" for i in range(args.budgets)])
                # the budgets stage's first load holds every budget
                for name in stack.names:
                    if name not in (*INFRASTRUCTURE, "query-api"):
                        await asyncio.to_thread(stack.start_component, name)
                async with httpx.AsyncClient(base_url=stack.gateway_url, headers=auth, timeout=30) as gateway:
                    await phase(gateway, receiver, warmup, args.interval, 0)
                    results = {
                        "idle": await phase(gateway, receiver, idle, args.interval, 0),
                        "background": await phase(gateway, receiver, loaded, args.interval, args.background_rate),
                    }
                duplicates = len(receiver.at("/alerts")) - len({r.json()["alert_id"] for r in receiver.at("/alerts")})
                results["duplicates"] = duplicates
                return results
            finally:
                stack.stop()


def render(results: dict, args: argparse.Namespace) -> str:
    rows = []
    for name, label in (("idle", "idle (crossings only)"),
                        ("background", f"background {args.background_rate:,.0f} events/s")):  # fmt: skip
        r = results[name]
        verdict = "meets" if r["p99"] <= TARGET_P99_S else "MISSES"
        rows.append(f"| {label} | {r['crossings']} | {r['p50'] * 1000:.0f} | {r['p99'] * 1000:.0f} | "
                    f"{r['max'] * 1000:.0f} | {r['notify_p50'] * 1000:.0f} / {r['notify_p99'] * 1000:.0f} | "
                    f"{verdict} the 1 s target |")  # fmt: skip
    return "\n".join([
        "## Alerts",
        "",
        f"Alert latency: the gateway's 202 for the event crossing a threshold -> the alert received by a "
        f"generic webhook (signed) on loopback. Whole embedded stack (`spendstream.devstack.Stack`, product "
        f"defaults); {args.budgets} budgets per phase (total window, 1.00 USD, 50/80/100 %), three crossing "
        f"events each, one event every {args.interval:g} s; see `bench/bench_alerts.py` for the method.",
        "",
        f"Command: `.venv/bin/python -m bench.bench_alerts --budgets {args.budgets} --interval {args.interval:g} "
        f"--background-rate {args.background_rate:g} --write-results`",
        f"Machine: {machine()}.",
        "",
        "| phase | crossings | p50 ms | p99 ms | max ms | of which notify p50 / p99 ms | target |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Every crossing's alert arrived; alerts received twice: {results['duplicates']}. \"Of which notify\": "
        "the alert's `created_at` (set by the budgets stage when it emits) to its arrival, wall clock.",
        "The rest is upstream of notify: the gateway, three Kafka hops (against the embedded broker each waits "
        "up to its 100 ms fetch wait, see `spendstream/kafka.py`) and the pricing and budgets stages' batch windows.",
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, default=30, help="budgets per phase (3 crossings each)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between crossing events")
    parser.add_argument("--background-rate", type=float, default=1000.0, help="events/s in the second phase")
    parser.add_argument("--write-results", action="store_true", help='update the "Alerts" section of bench/RESULTS.md')
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    report = render(results, args)
    print(report)
    if args.write_results:
        replace_section("Alerts", report)
        print("updated bench/RESULTS.md")


if __name__ == "__main__":
    main()
