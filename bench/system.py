"""System benchmark: the whole embedded stack on this machine, as `spendstream dev` runs it.

    .venv/bin/python -m bench [--duration 60] [--with-query-bench] [--no-write]

Starts the stack with ``spendstream.devstack.Stack`` (product defaults, a data directory of its
own), measures the baselines (bench/baselines.py) and then:

1. sustained end-to-end throughput: batched requests (``--batch`` events each) on
   ``--connections`` connections for ``--duration`` s; a sender waits while more than
   ``--max-backlog`` accepted events are not yet in ClickHouse, so the rate is what the whole
   pipeline sustains (rows landing in ``usage_events``), not what the gateway can queue;
2. freshness: single-event probes every 100 ms, each with an agent name of its own; a poller
   reads ``usage_minute`` every 20 ms; freshness = first seen there - the gateway's 202. Idle and
   under background load (half the sustained rate);
3. alert latency: ``bench/bench_alerts.py`` (notify issue) when present;
4. budget check: ``bench/bench_budgets.py`` when present; dashboard queries at 100M events:
   ``bench/bench_query.py`` (``--with-query-bench``, ≈ 15 min; its own section);
5. resident memory of every process, idle and at the end of the throughput run.

Each process's CPU time is read over the throughput window, and a further ``--profile-seconds``
of the same load is sampled with py-spy (every Python process of the stack at once) to name the
hot spots. Writes the "System (end to end)" section of bench/RESULTS.md, keeping the others.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench import baselines  # noqa: E402
from bench.baselines import Latency  # noqa: E402
from bench.load import Bodies, LoadResult, closed_loop, paced  # noqa: E402
from bench.profile import HotSpots, cpu_seconds, hot_spots, rss_mb, start_py_spy  # noqa: E402
from spendstream.clickhouse import get_client  # noqa: E402
from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings  # noqa: E402
from stream_processors.stages import STAGES  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "System (end to end)"
TARGET_EVENTS_S = 30_000
TARGET_FRESHNESS_P99_MS = 1_000
TARGET_ALERT_P99_MS = 1_000
TARGET_BUDGET_CHECK_P99_MS = 5
PROBE_PROJECT = "bench-probe"
#: the sink window the default replaced (fewer, larger inserts): what the shorter default buys
LONG_SINK_WINDOW_S = 1.0


@dataclass
class Figures:
    """Everything measured in one run, rendered by :func:`render`."""

    command: str
    started: datetime
    components: tuple[str, ...]
    baseline: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)
    rss_idle: dict[str, float] = field(default_factory=dict)
    rss_load: dict[str, float] = field(default_factory=dict)
    freshness: dict[str, Freshness] = field(default_factory=dict)
    hot: dict[str, HotSpots] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    external_sections: list[str] = field(default_factory=list)
    #: label -> (p50 ms, p99 ms), read back from the sections the other benchmarks wrote
    alerts: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: bench_query's printed report, when run (--with-query-bench)
    query_report: str = ""
    #: the product settings that shape the figures
    settings: dict[str, float] = field(default_factory=dict)
    budget_checks: dict[str, tuple[float, float]] = field(default_factory=dict)


# -- the stack ------------------------------------------------------------------------------------
def start_stack(work: Path) -> Stack:
    settings = local_settings(work, log_level="WARNING")
    components = (*INFRASTRUCTURE, "gateway", *STAGES, "query-api")
    return Stack(settings, work, components).start()


def processes(stack: Stack) -> dict[str, int]:
    return {name: pid for name in stack.names if (pid := stack.pid(name)) is not None}


class StoredCounter:
    """Rows in usage_events, sampled in a thread every ``interval`` s (the senders read ``latest``)."""

    def __init__(self, stack: Stack, interval: float = 0.25):
        self._client = get_client(stack.settings)
        self._interval = interval
        self.latest = self.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        return int(self._client.command(f"SELECT count() FROM usage_events WHERE project != '{PROBE_PROJECT}'"))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.latest = self.count()

    def __enter__(self) -> StoredCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


def own_cpu_seconds() -> float:
    """CPU time of this process alone (the stack's processes are its children)."""
    times = os.times()
    return times.user + times.system


async def drain(stored: StoredCounter, expected: int, timeout: float = 120.0) -> int:
    """Wait until ``expected`` rows are stored (or ``timeout``); the count then."""
    deadline = time.monotonic() + timeout
    while (count := stored.count()) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count


# -- scenarios ------------------------------------------------------------------------------------
async def throughput(stack: Stack, bodies: Bodies, args: argparse.Namespace, figures: Figures) -> None:
    key = stack.settings.bootstrap_admin_key.get_secret_value()
    url = stack.gateway_url + "/v1/events"
    pids = processes(stack)
    with StoredCounter(stack) as stored:
        base = stored.latest
        sent = LoadResult()

        def backlog() -> int:
            return base + sent.accepted - stored.latest

        common = dict(connections=args.connections, backlog=backlog, max_backlog=args.max_backlog, result=sent)
        await closed_loop(url, key, bodies, seconds=args.warmup, **common)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu_before["load generator"] = own_cpu_seconds()
        t0, stored0, accepted0 = time.monotonic(), stored.count(), sent.accepted
        window = len(sent.latencies_s)
        await closed_loop(url, key, bodies, seconds=args.duration, **common)
        elapsed = time.monotonic() - t0
        stored1, accepted1 = stored.count(), sent.accepted
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu_after["load generator"] = own_cpu_seconds()
        figures.rss_load = {name: rss_mb(pid) for name, pid in pids.items()}
        drain_started = time.monotonic()
        drained = await drain(stored, base + sent.accepted)
    figures.throughput = {
        "seconds": elapsed,
        "stored_per_s": (stored1 - stored0) / elapsed,
        "accepted_per_s": (accepted1 - accepted0) / elapsed,
        "requests": sent.requests,
        "errors": dict(sent.errors),
        "request_latency": Latency.of(sent.latencies_s[window:]),
        "drain_s": time.monotonic() - drain_started,
        "lost": base + sent.accepted - drained,
    }
    figures.cpu_share = {name: (cpu_after[name] - cpu_before[name]) / elapsed for name in cpu_after}


async def profile(stack: Stack, bodies: Bodies, args: argparse.Namespace, work: Path, figures: Figures) -> None:
    python_components = [n for n in stack.names if n != "kafka"]
    spies = {}
    for name in python_components:
        pid = stack.pid(name)
        if pid is not None and (spy := start_py_spy(pid, args.profile_seconds, work / f"profile-{name}.txt")):
            spies[name] = spy
    if not spies:
        figures.notes.append("py-spy not found: no profile (pip install py-spy)")
        return
    key = stack.settings.bootstrap_admin_key.get_secret_value()
    with StoredCounter(stack) as stored:
        base, sent = stored.latest, LoadResult()
        await closed_loop(
            stack.gateway_url + "/v1/events",
            key,
            bodies,
            seconds=args.profile_seconds + 1,
            connections=args.connections,
            backlog=lambda: base + sent.accepted - stored.latest,
            max_backlog=args.max_backlog,
            result=sent,
        )
        await drain(stored, base + sent.accepted)  # the next scenario starts from an empty pipeline
    for name, spy in spies.items():
        spy.wait(60)
        out = work / f"profile-{name}.txt"
        if out.exists():
            figures.hot[name] = hot_spots(out)


@dataclass
class Freshness:
    total: Latency
    #: the split at the moment the pricing stage produced the priced record (its Kafka timestamp)
    to_priced: Latency
    priced_to_visible: Latency
    #: mean of the sink's own "store and ack one batch" time during the phase (its /metrics), s
    sink_flush_s: float | None = None


def sink_flush_totals(stack: Stack) -> tuple[float, float] | None:
    """(sum, count) of the sink's spendstream_sink_flush_seconds histogram, if it exports one."""
    port = stack.settings.processors.web_port + STAGES.index("sink")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        for name in ("spendstream_sink_flush_seconds_sum", "spendstream_sink_flush_seconds_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    return (
        (values["spendstream_sink_flush_seconds_sum"], values["spendstream_sink_flush_seconds_count"])
        if len(values) == 2
        else None
    )


async def priced_record_times(stack: Stack, locations: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Kafka timestamps (unix s) of the usage.priced records at (partition, offset), by probe."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from spendstream.kafka import consumer_kwargs
    from spendstream.topics import USAGE_PRICED

    consumer = AIOKafkaConsumer(**consumer_kwargs(stack.settings, None))
    await consumer.start()
    try:
        tps = {p: TopicPartition(USAGE_PRICED.name, p) for p, _ in locations.values()}
        consumer.assign(list(tps.values()))
        at: dict[tuple[int, int], float] = {}
        for partition, offset in sorted(set(locations.values())):
            if (partition, offset) in at:
                continue
            consumer.seek(tps[partition], offset)
            for msg in (await consumer.getmany(tps[partition], timeout_ms=5_000)).get(tps[partition], []):
                at[(partition, msg.offset)] = msg.timestamp / 1000
        return {agent: at[loc] for agent, loc in locations.items() if loc in at}
    finally:
        await consumer.stop()


async def freshness(stack: Stack, bodies: Bodies, background_events_s: float, seconds: float) -> Freshness:
    """Single-event probes every 100 ms during ``seconds`` (with paced background load if > 0).
    Wall-clock times throughout, to compare with the priced records' Kafka timestamps."""
    key = stack.settings.bootstrap_admin_key.get_secret_value()
    tenant = stack.settings.bootstrap_tenant
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    probing_done = threading.Event()
    run_id = os.urandom(3).hex()

    def poll() -> None:
        client = get_client(stack.settings)
        give_up = float("inf")
        try:
            while time.monotonic() < give_up and not (probing_done.is_set() and seen.keys() >= acked.keys()):
                started, started_wall = time.monotonic(), time.time()
                rows = client.query(
                    "SELECT agent FROM usage_minute WHERE tenant = {t:String} AND project = {p:String}"
                    " AND startsWith(agent, {r:String}) GROUP BY agent",
                    parameters={"t": tenant, "p": PROBE_PROJECT, "r": run_id},
                ).result_rows
                for (agent,) in rows:
                    # it became visible after the previous query began and before this one ended
                    seen.setdefault(agent, started_wall)
                if probing_done.is_set() and give_up == float("inf"):
                    give_up = time.monotonic() + 30
                time.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
        finally:
            client.close()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    async def probes() -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=30) as client:
            n = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                agent = f"{run_id}-{n}"
                event = {
                    "project": PROBE_PROJECT,
                    "agent": agent,
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "input_tokens": 100,
                    "output_tokens": 10,
                }
                resp = await client.post(stack.gateway_url + "/v1/events", json=event, headers=headers)
                if resp.status_code == 202:
                    acked[agent] = time.time()
                n += 1
                await asyncio.sleep(0.1)

    flush_before = sink_flush_totals(stack)
    with StoredCounter(stack) as stored:
        before = stored.latest
        jobs = [probes()]
        if background_events_s:
            jobs.append(
                paced(stack.gateway_url + "/v1/events", key, bodies, seconds=seconds, events_per_s=background_events_s)
            )
        done = await asyncio.gather(*jobs)
        probing_done.set()
        await asyncio.to_thread(poller.join)
        if background_events_s:
            await drain(stored, before + done[1].accepted)  # the next scenario starts from an empty pipeline
    missing = set(acked) - set(seen)
    if missing:
        raise RuntimeError(f"{len(missing)} acknowledged probes never appeared in usage_minute")
    client = get_client(stack.settings)
    try:
        locations = {
            agent: (int(p), int(o))
            for agent, p, o in client.query(
                "SELECT agent, partition, offset FROM usage_events WHERE tenant = {t:String} AND project = {p:String}"
                " AND startsWith(agent, {r:String})",
                parameters={"t": tenant, "p": PROBE_PROJECT, "r": run_id},
            ).result_rows
        }
    finally:
        client.close()
    priced_at = await priced_record_times(stack, locations)
    flush_after = sink_flush_totals(stack)
    flush_s = None
    if flush_before and flush_after and flush_after[1] > flush_before[1]:
        flush_s = (flush_after[0] - flush_before[0]) / (flush_after[1] - flush_before[1])
    return Freshness(
        Latency.of([max(0.0, seen[a] - acked[a]) for a in acked]),
        Latency.of([max(0.0, priced_at[a] - acked[a]) for a in acked if a in priced_at]),
        Latency.of([max(0.0, seen[a] - priced_at[a]) for a in acked if a in priced_at]),
        flush_s,
    )


def run_external(script: str, section: str, what: str, figures: Figures) -> str | None:
    """Another engineer's benchmark (it starts a stack of its own); its report as printed, or None.
    Its own section of RESULTS.md is left as its owner last wrote it."""
    if importlib.util.find_spec(f"bench.{script}") is None:
        figures.notes.append(f"`bench/{script}.py` is not in the repository yet: {what} not measured.")
        return None
    cmd = [sys.executable, "-m", f"bench.{script}"]
    print("running", " ".join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(result.stdout, flush=True)
    if result.returncode != 0:
        figures.notes.append(f"{what}: `python -m bench.{script}` failed (exit {result.returncode}); no figures.")
        return None
    figures.external_sections.append(
        f'{what}: measured by `python -m bench.{script}` in this run (its method: the "{section}" section).'
    )
    return result.stdout


def section_rows(report: str, section: str) -> dict[str, tuple[float, float]]:
    """(p50 ms, p99 ms) by first cell of the table rows of a report's ``## section`` whose third
    and fourth cells are the p50 and p99 in ms (the Alerts and Budgets reports' layout)."""
    start = report.find(f"## {section}\n")
    if start < 0:
        return {}
    end = report.find("\n## ", start + 1)
    rows = {}
    for line in report[start : end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4:
            try:
                rows[cells[0]] = (float(cells[2].split()[0]), float(cells[3].split()[0]))
            except ValueError:
                continue
    return rows


# -- report ---------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return f"{head}{' (with uncommitted changes in the working tree)' if dirty else ''}"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "**PASS**"
    miss = (target - value) / target if higher_is_better else (value - target) / target
    return f"**MISS** by {miss:.0%}" if miss >= 0.01 else f"**MISS** by {miss:.1%}"


def render(f: Figures) -> str:
    b, t = f.baseline, f.throughput
    lines = [
        f"## {SECTION}",
        "",
        f"Measured {f.started:%Y-%m-%d %H:%M} UTC at commit {commit()} with `{f.command}`.",
        f"Machine: {machine()}; the box is shared with other engineers' work (load average "
        f"{os.getloadavg()[0]:.1f} at the end). Everything co-located: {', '.join(f.components)} and the load "
        "generator, each its own process, started by `spendstream.devstack.Stack` with the product's default "
        "settings.",
        "",
        "### Baselines (same run, same broker and ClickHouse)",
        "",
        "| bare part | figure |",
        "|---|---|",
        f"| bare FastAPI endpoint, same bodies and client ({f.throughput.get('batch', '?')}-event POSTs) | "
        f"{b['http']['events_s']:,.0f} events/s ({b['http']['requests_s']:,.0f} req/s), {b['http']['batch_latency']} |",
        f"| bare FastAPI, one-event POST, one at a time | {b['http']['post_one']} |",
        f"| bare FastAPI, GET of a constant, one at a time | {b['http']['get']} |",
        f"| raw aiokafka produce, the gateway's records (snappy, acks=all) | {b['kafka']['produce_events_s']:,.0f} events/s |",
        f"| raw aiokafka consume of those records | {b['kafka']['consume_events_s']:,.0f} events/s |",
        f"| raw aiokafka one record produce → consume | {b['kafka']['hop']} |",
        f"| raw INSERT, 10k rows/insert as Native columns, plain copy of usage_events | {b['insert']['insert_plain_rows_s']:,.0f} rows/s |",
        f"| raw INSERT, the same rows as the sink sends them (JSONEachRow priced records into usage_events_in → usage_events + five views) | {b['insert']['insert_with_views_rows_s']:,.0f} rows/s |",
        f"| raw INSERT of one row, plain table | {b['insert']['insert_one_plain']} |",
        f"| raw INSERT of one event as the sink sends it (usage_events_in → usage_events + five views) | {b['insert']['insert_one']} |",
        f"| `SELECT 1` over HTTP | {b['insert']['select_1']} |",
        "",
    ]
    floor = b["http"]["post_one"].p50_ms + 2 * b["kafka"]["hop"].p50_ms + b["insert"]["insert_one"].p50_ms
    floor99 = b["http"]["post_one"].p99_ms + 2 * b["kafka"]["hop"].p99_ms + b["insert"]["insert_one"].p99_ms
    rate = t["stored_per_s"]
    bottleneck = min(b["http"]["events_s"], b["kafka"]["produce_events_s"], b["insert"]["insert_with_views_rows_s"])
    lines += [
        "### 1. Sustained end-to-end throughput",
        "",
        f"{t['seconds']:.0f} s after a {t['warmup']:.0f} s warm-up, {t['batch']}-event requests on {t['connections']} "
        f"connections, at most {t['max_backlog']:,} accepted events not yet stored.",
        "",
        "| figure | value | target | ratio to baseline |",
        "|---|---|---|---|",
        f"| events/s stored in usage_events (ingest → ClickHouse) | **{rate:,.0f}** | ≥ {TARGET_EVENTS_S:,} "
        f"{verdict(rate, TARGET_EVENTS_S, True)} | {rate / b['http']['events_s']:.2f} of bare FastAPI, "
        f"{rate / b['kafka']['produce_events_s']:.2f} of raw produce, {rate / b['insert']['insert_with_views_rows_s']:.2f} "
        "of raw INSERT (with views) |",
        f"| events/s acknowledged by the gateway | {t['accepted_per_s']:,.0f} | | |",
        f"| request latency (202) | {t['request_latency']} | | p50 {t['request_latency'].p50_ms / b['http']['batch_latency'].p50_ms:.1f}x bare FastAPI |",
        f"| drain after the load stopped | {t['drain_s']:.1f} s | | |",
        f"| acknowledged but not stored after the drain | {t['lost']} | 0 | |",
        f"| non-202 answers | {t['errors'] or 'none'} | | |",
        "",
        "### 5. CPU and memory of each process",
        "",
        "CPU over the throughput window (in cores, 2 available, and per stored event) and resident memory "
        "(process and its children) idle after start-up and at the end of the throughput window:",
        "",
        "| process | cores | CPU µs per event | RSS idle | RSS under load |",
        "|---|---|---|---|---|",
    ]
    for name in [*f.rss_idle, "load generator"]:
        cores = f.cpu_share.get(name, 0)
        lines.append(
            f"| {name} | {cores:.2f} | {cores / rate * 1e6:.1f} | {_mb(f.rss_idle.get(name))} | "
            f"{_mb(f.rss_load.get(name))} |"
        )
    total_cores = sum(f.cpu_share.values())
    lines += [
        f"| **total** | {total_cores:.2f} | {total_cores / rate * 1e6:.1f} | {_mb(sum(f.rss_idle.values()))} | "
        f"{_mb(sum(f.rss_load.values()))} |",
        "",
    ]
    lines += throughput_analysis(f, rate, total_cores)
    if f.hot:
        lines += [
            f"Hot spots (py-spy, {f.throughput.get('profile_seconds', 0):.0f} s of the same load; innermost "
            "Python frame as a share of the samples in which a thread was busy, time in C extensions counted "
            "in their caller; waiting frames left out):",
            "",
        ]
        for name, spots in f.hot.items():
            if spots.busy:
                shares = "; ".join(f"{share:.0%} `{frame}`" for frame, share in spots.self_time[:6])
                lines.append(f"- **{name}** ({spots.busy} busy of {spots.samples} samples): {shares}")
        lines.append("")
    lines += [
        "### 2. Freshness (gateway 202 → visible in usage_minute)",
        "",
        "| load | freshness | target p99 | ratio to baseline floor | 202 → priced record produced | "
        "→ visible (sink, insert) | sink's mean flush |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, fr in f.freshness.items():
        lat = fr.total
        lines.append(
            f"| {label} | {lat} | ≤ {TARGET_FRESHNESS_P99_MS} ms {verdict(lat.p99_ms, TARGET_FRESHNESS_P99_MS, False)} "
            f"| p50 {lat.p50_ms / floor:.1f}x, p99 {lat.p99_ms / floor99:.1f}x | "
            f"p50 {fr.to_priced.p50_ms:.0f} ms, p99 {fr.to_priced.p99_ms:.0f} ms | "
            f"p50 {fr.priced_to_visible.p50_ms:.0f} ms, p99 {fr.priced_to_visible.p99_ms:.0f} ms | "
            f"{'–' if fr.sink_flush_s is None else f'{fr.sink_flush_s * 1000:.0f} ms'} |"
        )
    lines += [
        "",
        f"Baseline floor: bare one-event POST + 2 × raw produce → consume + one-row INSERT = p50 {floor:.1f} ms, "
        f"p99 {floor99:.1f} ms (the path has two Kafka hops: usage.raw and usage.priced). Poll resolution 20 ms. "
        f"Both stages batch by time (product defaults): pricing waits up to "
        f"{f.settings['batch_max_seconds']:g} s, the sink up to {f.settings['sink_batch_seconds']:g} s for a batch "
        "to fill, so a lone event waits for both windows. The split: the priced record's Kafka timestamp "
        "(set when the pricing stage produced it).",
        "",
        f"Raw parts bound the throughput at {bottleneck:,.0f} events/s each alone; they share 2 cores here.",
        "",
    ]
    post, hop = b["http"]["post_one"], b["kafka"]["hop"]
    if f.alerts:
        # gateway POST, four Kafka hops (usage.raw, usage.priced, budget.deltas, budget.alerts), webhook POST
        a50, a99 = 2 * post.p50_ms + 4 * hop.p50_ms, 2 * post.p99_ms + 4 * hop.p99_ms
        lines += [
            "### 3. Alert latency (crossing event 202 → webhook received)",
            "",
            "| load | p50 | p99 | target p99 | ratio to baseline floor |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {p50:,.0f} ms | {p99:,.0f} ms | ≤ {TARGET_ALERT_P99_MS} ms "
            f"{verdict(p99, TARGET_ALERT_P99_MS, False)} | p50 {p50 / a50:.1f}x, p99 {p99 / a99:.1f}x |"
            for label, (p50, p99) in f.alerts.items()
        ]
        lines += [
            "",
            f"Baseline floor: 2 × bare one-event POST (ingest, webhook) + 4 × raw produce → consume "
            f"(usage.raw, usage.priced, budget.deltas, budget.alerts) = p50 {a50:.1f} ms, p99 {a99:.1f} ms.",
            "",
        ]
    if f.budget_checks:
        lines += [
            "### 4. Budget check",
            "",
            "| load | p50 | p99 | target p99 | ratio to bare FastAPI one-event POST |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {p50:.2f} ms | {p99:.2f} ms | ≤ {TARGET_BUDGET_CHECK_P99_MS} ms "
            f"{verdict(p99, TARGET_BUDGET_CHECK_P99_MS, False)} | p50 {p50 / post.p50_ms:.1f}x, "
            f"p99 {p99 / post.p99_ms:.1f}x |"
            for label, (p50, p99) in f.budget_checks.items()
        ]
        lines.append("")
    if f.query_report:
        lines += [
            "### Dashboard queries at 100M events (bench/bench_query.py, this run)",
            "",
            *[line for line in f.query_report.splitlines() if line.startswith("|")],
            "",
        ]
    lines += closing_note(f, rate, total_cores)
    lines += ["### Other scenarios", ""]
    lines += [f"- {s}" for s in f.external_sections] + [f"- {n}" for n in f.notes] + [""]
    return "\n".join(lines)


def throughput_analysis(f: Figures, rate: float, total_cores: float) -> list[str]:
    """What limits the sustained rate, from this run's figures."""
    cores = os.cpu_count() or 1
    budget_us = cores / TARGET_EVENTS_S * 1e6
    spent_us = total_cores / rate * 1e6
    stack = {n: c for n, c in f.cpu_share.items() if n != "load generator"}
    top = sorted(stack.items(), key=lambda kv: -kv[1])[:4]
    shares = ", ".join(f"{n} {c / total_cores:.0%}" for n, c in top)
    bound = (
        "CPU-bound: the cores were saturated"
        if total_cores >= 0.85 * cores
        else (
            f"not CPU-bound by its own processes ({total_cores:.2f} of {cores} cores; the box is shared, or a stage "
            "waits on another)"
        )
    )
    return [
        f"What limits it: {bound}. The whole pipeline spends {spent_us:.0f} µs of CPU per event (load generator "
        f"included); {TARGET_EVENTS_S:,} events/s on {cores} cores allows {budget_us:.0f} µs. Shares of the CPU: "
        f"{shares}.",
        "",
    ]


def closing_note(f: Figures, rate: float, total_cores: float) -> list[str]:
    """Where the targets stand and what would close the gaps, from this run's figures."""
    cores = os.cpu_count() or 1
    spent_us, budget_us = total_cores / rate * 1e6, cores / TARGET_EVENTS_S * 1e6
    hot = "; ".join(
        f"{name}: `{spots.self_time[0][0]}` {spots.self_time[0][1]:.0%}"
        for name, spots in f.hot.items()
        if spots.self_time and name in ("gateway", "pricing", "budgets", "sink")
    )
    lines = ["### Closing note", ""]
    if rate < TARGET_EVENTS_S:
        lines.append(
            f"- Throughput: {rate:,.0f} events/s is {1 - rate / TARGET_EVENTS_S:.0%} short of {TARGET_EVENTS_S:,}. "
            f"Per event the co-located stack spends {spent_us:.0f} µs of CPU where 30k/s on {cores} cores leaves "
            f"{budget_us:.0f} µs ({spent_us / budget_us:.1f}x); no single process holds the gap (table above), so one "
            f"fix does not close it. Top frames: {hot or 'no profile'}. What would close it: less CPU per event in "
            "every stage (each stage that reads usage.priced parses every JSON envelope again; a compact binary "
            "priced format, or the sink and budgets in one consumer, would parse once), and more cores: the stages "
            "are separate processes and scale out by partitions, which a 2-core box cannot show."
        )
    idle = next(iter(f.freshness.values()), None)
    if idle is not None and idle.total.p99_ms > TARGET_FRESHNESS_P99_MS:
        sink_share = idle.priced_to_visible.p50_ms / idle.total.p50_ms if idle.total.p50_ms else 0
        insert = f.baseline["insert"]
        text = (
            f"- Freshness: idle p99 {idle.total.p99_ms:.0f} ms misses 1 s by {idle.total.p99_ms / 1000 - 1:.0%}. "
            f"{sink_share:.0%} of the median is spent after the pricing stage produced the record: the sink's "
            f"window ({f.settings['sink_batch_seconds']:g} s), its flush"
            + (f" (mean {idle.sink_flush_s * 1000:.0f} ms here)" if idle.sink_flush_s else "")
            + f" and the insert through five materialized views (one row alone: p50 {insert['insert_one'].p50_ms:.0f}"
            f" ms, {insert['insert_one_plain'].p50_ms:.0f} ms into a table without views). "
        )
        long = next((fr for label, fr in f.freshness.items() if "sink_batch_seconds" in label), None)
        if long is not None:
            text += (
                f"With a {LONG_SINK_WINDOW_S:g} s sink window p50 was {long.total.p50_ms:.0f} ms and p99 "
                f"{long.total.p99_ms:.0f} ms. The tail is then bounded by the insert path, not only the window: "
                "a cheaper insert (fewer views and deduplication logs written per insert, or the last minutes "
                "read from usage_events instead of usage_minute) would close the gap; the embedded ClickHouse's "
                "per-insert cost is not a server's, so re-measure on a real ClickHouse before changing the design."
            )
        lines.append(text)
    loaded = next(((label, fr) for label, fr in f.freshness.items() if label.startswith("background")), None)
    if loaded is not None and loaded[1].total.p99_ms > TARGET_FRESHNESS_P99_MS:
        label, fr = loaded
        text = (
            f"- Freshness under load ({label}): p99 {fr.total.p99_ms:.0f} ms misses 1 s by "
            f"{fr.total.p99_ms / 1000 - 1:.0%}. Both halves grow: the priced record is produced p99 "
            f"{fr.to_priced.p99_ms:.0f} ms after the 202, and is visible p99 {fr.priced_to_visible.p99_ms:.0f} ms "
            "after that"
        )
        if idle is not None:
            text += f" (idle: {idle.to_priced.p99_ms:.0f} and {idle.priced_to_visible.p99_ms:.0f} ms)"
        if fr.sink_flush_s and idle is not None and idle.sink_flush_s:
            text += (
                f"; the sink's mean flush (insert through the views) takes {fr.sink_flush_s * 1000:.0f} ms, "
                f"idle {idle.sink_flush_s * 1000:.0f} ms"
            )
        text += (
            f". Every stage and ClickHouse share the same {cores} cores, so each batch waits for CPU and a larger "
            "insert; not profiled further. What would close it: ClickHouse on its own cores (a server's inserts "
            "do not compete with the stages), and, if needed, the last minutes read from usage_events instead of "
            "waiting for the aggregate."
        )
        lines.append(text)
    lines.append("")
    return lines


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} MiB"


def write_section(report: str) -> None:
    from bench.stage_bench import replace_section

    replace_section(SECTION, report)


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the measured throughput window")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=500, help="events per request")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--max-backlog", type=int, default=60_000, help="accepted events not yet stored, at most")
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--profile-seconds", type=float, default=20.0, help="0 = no py-spy profile")
    parser.add_argument(
        "--with-query-bench", action="store_true", help="also run bench/bench_query.py (100M events, slow)"
    )
    parser.add_argument(
        "--no-external", action="store_true", help="skip bench_alerts / bench_budgets (they start stacks of their own)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the ClickHouse data too (logs, py-spy profiles and the report always stay)",
    )
    args = parser.parse_args(argv)
    command = "python -m bench" + (
        "" if argv is None and len(sys.argv) == 1 else " " + shlex.join(argv or sys.argv[1:])
    )

    work = Path(tempfile.mkdtemp(prefix="spendstream-bench-"))
    print(f"stack data and logs: {work}", flush=True)
    stack = start_stack(work)
    figures = Figures(command, datetime.now(UTC), stack.names)
    s = stack.settings
    figures.settings = {"batch_max_seconds": s.processors.batch_max_seconds, "sink_batch_seconds": s.sink.batch_seconds}
    bodies = Bodies(args.batch)
    try:
        time.sleep(5)  # let start-up work (topic creation, first assignments) settle before the idle RSS
        figures.rss_idle = {name: rss_mb(pid) for name, pid in processes(stack).items()}
        print("baselines ...", flush=True)
        figures.baseline = {
            "http": asyncio.run(baselines.bare_http(work, bodies, 10, args.connections)),
            "kafka": asyncio.run(baselines.raw_kafka(stack.settings, bodies, 10)),
            "insert": baselines.raw_insert(stack.settings, bodies),
        }
        print(f"throughput ({args.duration:.0f} s) ...", flush=True)
        asyncio.run(throughput(stack, bodies, args, figures))
        figures.throughput.update(
            batch=args.batch,
            connections=args.connections,
            warmup=args.warmup,
            max_backlog=args.max_backlog,
            profile_seconds=args.profile_seconds,
        )
        print(f"  {figures.throughput['stored_per_s']:,.0f} events/s stored", flush=True)
        if args.profile_seconds:
            print("profile ...", flush=True)
            asyncio.run(profile(stack, bodies, args, work, figures))
        print("freshness ...", flush=True)
        figures.freshness["idle (probes only)"] = asyncio.run(freshness(stack, bodies, 0, args.freshness_seconds))
        half = max(500, round(figures.throughput["stored_per_s"] / 2, -3))
        figures.freshness[f"background {half:,.0f} events/s"] = asyncio.run(
            freshness(stack, bodies, half, args.freshness_seconds)
        )
        # the sink's time window was the largest wait on the path: what does the shorter default buy?
        stack.restart("sink", {"SPENDSTREAM_SINK__BATCH_SECONDS": str(LONG_SINK_WINDOW_S)})
        figures.freshness[
            f"idle, sink_batch_seconds={LONG_SINK_WINDOW_S:g} (default {stack.settings.sink.batch_seconds:g})"
        ] = asyncio.run(freshness(stack, bodies, 0, args.freshness_seconds))
    finally:
        stack.stop()
    if args.no_external:
        figures.notes.append("alert latency and budget check not run (`--no-external`).")
    elif report := run_external(
        "bench_alerts", "Alerts", "Alert latency (crossing event 202 → webhook received)", figures
    ):
        figures.alerts = {
            k: v for k, v in section_rows(report, "Alerts").items() if k.startswith(("idle", "background"))
        }
    if not args.no_external and (report := run_external("bench_budgets", "Budgets", "Budget check", figures)):
        figures.budget_checks = {
            k: v for k, v in section_rows(report, "Budgets").items() if k.startswith("budget check")
        }
    if args.with_query_bench and (report := run_external("bench_query", "Query API", "Dashboard queries", figures)):
        figures.query_report = report
    else:
        figures.notes.append(
            "Dashboard queries at 100M events: not run here (`python -m bench --with-query-bench` "
            'runs `bench/bench_query.py`, ≈ 15 min); see the "Query API" section for its last run.'
        )
    report = render(figures)
    saved = work / "system-section.md"
    saved.write_text(report)  # kept if writing RESULTS.md fails
    if args.no_write:
        print(report)
    else:
        write_section(report)
        print(f"updated {RESULTS} (the section is also in {saved})")
    if not args.keep:
        import shutil

        shutil.rmtree(work / "clickhouse", ignore_errors=True)  # the bulk; logs and the report stay
    return 0
