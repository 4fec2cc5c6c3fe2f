"""Query API benchmark: analytics answered from the aggregates vs the same queries on raw events.

    .venv/bin/python -m bench.bench_query [--events 100000000] [--data-dir /tmp/spendstream-bench-query]
                                          [--repeat 40] [--raw-repeat 5] [--write-results]

``--raw-repeat 0`` skips the raw baseline (≈ 20–30 s of CPU per raw query at 100M events).

Generates ``--events`` usage events straight into ClickHouse (``INSERT ... SELECT FROM numbers()``
in batches; the materialized views fill the aggregates as in production) over 90 days for one
tenant, plus 10 % as many for a second tenant, in an embedded ClickHouse whose data directory is
kept, so a second run with the same size reuses it (pending migrations are applied to it). Before
timing it waits until ClickHouse's background merges and mutations are done, as a server that
ingested this data over 90 days would be. Then it times, for the dashboard's 90-day range and with
ragged, non-aligned ends (as "now - 90 days" gives):

- overview, timeseries (day, UTC), breakdown by agent, as SQL built by ``query_api.usage_sql``
  and run through clickhouse-connect (what the API's handlers wait for), and end to end through
  the HTTP API (``spendstream query-api`` as a child process, as in production; httpx client);
- the same three queries forced onto ``usage_events`` (raw), for the ratio.

Wall-clock times grow with whatever else runs on the machine; the CPU time that the ClickHouse
process and the API process spend per query does not, so both are reported.

``--write-results`` replaces the "Query API" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]

import clickhouse_connect  # noqa: E402
import httpx  # noqa: E402
from query_api_stack import migrate, spawn_query_api  # noqa: E402

from bench.stage_bench import cpu_seconds, machine, replace_section  # noqa: E402
from query_api.filters import Filters  # noqa: E402
from query_api.usage_sql import OVERVIEW_MEASURES, GroupBy, UsageQuery, build_usage_query  # noqa: E402
from spendstream.clickhouse import get_client  # noqa: E402
from spendstream.embedded.clickhouse import EmbeddedClickHouse  # noqa: E402
from spendstream.ports import free_port  # noqa: E402
from spendstream.settings import Settings  # noqa: E402

TENANT, NOISE = "bench", "noise"
DATA_END = datetime(2024, 6, 30, tzinfo=UTC)
SPAN = timedelta(days=90)
BATCH = 5_000_000
TARGET_P95_MS = 100.0
SETTLE_POLL_S = 5.0
ADMIN_KEY = "ss_bench_admin_" + "b" * 24

# One event per number n: agents own a project, one or two models and five users, as fleets do;
# costs are integer nano-USD from the token counts. intHash64 spreads attributes without pattern.
GENERATOR = """
INSERT INTO usage_events (tenant, project, agent, user, session_id, operation, tags, provider, model,
    input_tokens, output_tokens, cache_read_tokens, cost_nanos, cost_input_nanos, cost_output_nanos,
    price_id, pricing_status, price_source, status, latency_ms, event_id, timestamp, received_at)
SELECT {tenant:String}, concat('project-', toString(a % 20)), concat('agent-', toString(a)),
    concat('user-', toString(a * 5 + bitShiftRight(h, 16) % 5)), concat('s', toString(bitShiftRight(h, 20) % 100000)), 'chat',
    map('env', if(bitShiftRight(h, 24) % 10 < 8, 'prod', 'staging')),
    ['openai', 'anthropic', 'google', 'mistral', 'bedrock'][m % 5 + 1], concat('model-', toString(m)),
    i, o, intDiv(i, 4), if(unknown, 0, i * 2500 + o * 10000), if(unknown, 0, i * 2500), if(unknown, 0, o * 10000),
    if(unknown, '', concat('catalog:model-', toString(m))), if(unknown, 'unknown_model', 'priced'),
    if(unknown, 'none', 'catalog'), if(bitShiftRight(h, 44) % 100 < 2, 'error', 'ok'), bitShiftRight(h, 48) % 3000,
    concat({tenant:String}, '-', toString(number)),
    fromUnixTimestamp64Milli({start_ms:Int64} + intDiv(number * {span_ms:Int64}, {total:UInt64}), 'UTC'),
    fromUnixTimestamp64Milli({start_ms:Int64} + intDiv(number * {span_ms:Int64}, {total:UInt64}), 'UTC')
FROM (
    SELECT number, intHash64(number + {salt:UInt64}) AS h, h % 200 AS a, (a + bitShiftRight(h, 8) % 2) % 20 AS m,
        bitShiftRight(h, 28) % 4000 AS i, bitShiftRight(h, 36) % 1000 AS o, m = 19 AND bitShiftRight(h, 40) % 100 < 3 AS unknown
    FROM numbers({first:UInt64}, {count:UInt64})
)
"""


def generate(settings: Settings, tenant: str, total: int, salt: int) -> float:
    """Fill ``tenant`` up to ``total`` events (resuming a partial run); returns rows/s of this run."""
    # a 5M-row batch with its materialized views can outlast the default 300 s read timeout on a busy box
    client = clickhouse_connect.get_client(
        dsn=settings.clickhouse_url,
        database=settings.clickhouse.database,
        autogenerate_session_id=False,
        send_receive_timeout=3600,
    )
    try:
        have = client.query(
            "SELECT count() FROM usage_events WHERE tenant = {t:String}", parameters={"t": tenant}
        ).result_rows[0][0]
        if have >= total:
            return 0.0
        if have % BATCH:
            raise SystemExit(f"{tenant} has {have} events, not a whole number of batches: use a fresh --data-dir")
        started, first = time.monotonic(), have
        start_ms = int((DATA_END - SPAN).timestamp() * 1000)
        while first < total:
            count = min(BATCH, total - first)
            client.command(
                GENERATOR,
                parameters={
                    "tenant": tenant,
                    "start_ms": start_ms,
                    "span_ms": int(SPAN.total_seconds() * 1000),
                    "total": total,
                    "salt": salt,
                    "first": first,
                    "count": count,
                },
                settings={"max_insert_threads": 2},
            )
            first += count
            rate = (first - have) / (time.monotonic() - started)
            print(f"  {tenant}: {first:,}/{total:,} events ({rate:,.0f}/s)", flush=True)
        return (total - have) / (time.monotonic() - started)
    finally:
        client.close()


def settle(settings: Settings, timeout_s: float) -> str:
    """Wait until no merge or mutation (a migration's MATERIALIZE PROJECTION) runs; returns what was seen."""
    client = get_client(settings)
    started = time.monotonic()
    busy = (
        "SELECT (SELECT count() FROM system.merges WHERE database = {db:String}), "
        "(SELECT count() FROM system.mutations WHERE database = {db:String} AND NOT is_done)"
    )
    try:
        while True:
            merges, mutations = client.query(busy, parameters={"db": settings.clickhouse.database}).result_rows[0]
            waited = time.monotonic() - started
            if not merges and not mutations:
                return f"merges and mutations done after {waited:.0f} s of waiting"
            if waited > timeout_s:
                return f"still {merges} merges and {mutations} mutations running after {waited:.0f} s"
            print(f"  waiting for {merges} merges, {mutations} mutations ({waited:.0f} s)", flush=True)
            time.sleep(SETTLE_POLL_S)
    finally:
        client.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


class Timing:
    """Wall-clock ms of each run, and CPU ms per run of the processes watched (load-independent)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.samples: list[float] = []
        self.cpu: dict[str, float] = {}

    def run(self, repeat: int, once) -> Timing:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        for _ in range(repeat):
            t = time.perf_counter()
            once()
            self.samples.append((time.perf_counter() - t) * 1000)
        self.cpu = {name: (cpu_seconds(pid) - before[name]) * 1000 / repeat for name, pid in self.pids.items()}
        return self

    def wall(self) -> str:
        p50, p95 = percentiles(self.samples)
        return f"{p50:.1f} / {p95:.1f}"


def reads(client, built) -> str:
    """Each table the query names, with the projection ClickHouse's plan reads instead, if any."""
    plan = client.query("EXPLAIN projections = 1 " + built.sql, parameters=built.params).result_rows
    read = [m[1].rsplit(".", 1)[-1] for (line,) in plan if (m := re.search(r"ReadFromMergeTree \((.*)\)", line))]
    if len(read) != len(built.tables):  # the plan's sub-selects are the query's, in order
        return ", ".join(built.tables) + f" (plan reads {', '.join(read)})"
    return ", ".join(t if r == t else f"{t} (projection {r})" for t, r in zip(built.tables, read))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000_000, help="events of the measured tenant")
    parser.add_argument("--data-dir", default="/tmp/spendstream-bench-query", help="kept between runs")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--raw-repeat", type=int, default=5)
    parser.add_argument("--settle-timeout", type=float, default=1800.0, help="s to wait for merges and mutations")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    data_dir = Path(args.data_dir) / f"events-{args.events}"
    clickhouse = EmbeddedClickHouse(path=str(data_dir / "chdb")).start()
    try:
        settings = Settings(
            clickhouse={"url": clickhouse.url, "database": "bench"},
            bootstrap_admin_key=ADMIN_KEY,
            bootstrap_tenant=TENANT,
            query_api={"port": free_port()},
            data_dir=str(data_dir),
        )
        migrate(settings)
        print(f"generating into {data_dir} ...", flush=True)
        rate = generate(settings, TENANT, args.events, salt=0)
        # whole batches, so that an interrupted run can resume (below one batch: a smoke test's size)
        generate(settings, NOISE, args.events // 10 // BATCH * BATCH or args.events // 10, salt=1_000_000_007)
        settled = settle(settings, args.settle_timeout)
        report = measure(settings, args, rate, settled, clickhouse.pid)
    finally:
        clickhouse.stop()
    print(report)
    if args.write_results:
        replace_section("Query API", report)
        print("updated bench/RESULTS.md")


def measure(settings: Settings, args: argparse.Namespace, rate: float, settled: str, server_pid: int) -> str:
    client = get_client(settings)
    sizes = dict(
        client.query(
            "SELECT table, sum(rows) FROM system.parts WHERE database = 'bench' AND active GROUP BY table"
        ).result_rows
    )
    parts = dict(
        client.query(
            "SELECT table, count() FROM system.parts WHERE database = 'bench' AND active AND table LIKE 'usage%' GROUP BY table"
        ).result_rows
    )
    load_before = os.getloadavg()
    now = DATA_END - timedelta(minutes=7, seconds=12, milliseconds=345)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ranges = {
        # what the dashboard sends for "last 90 days" (day buckets): the days from the one holding
        # now - 90 days through today (query_api/static/app.js, currentFilters)
        "dashboard range": Filters(
            start=(now - SPAN).replace(hour=0, minute=0, second=0, microsecond=0),
            end=today + timedelta(days=1),
            tz=ZoneInfo("UTC"),
        ),
        # an API caller's now - 90 days: ragged ends down to the millisecond (raw edges)
        "ragged ends": Filters(start=now - SPAN, end=now, tz=ZoneInfo("UTC")),
    }
    rows = []
    api = spawn_query_api(settings, str(Path(settings.data_dir) / "query-api.log"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.query_api.port}",
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:  # fmt: skip
            for variant, filters in ranges.items():
                for name, (q, kw, path, params) in queries(filters).items():
                    built = build_usage_query(q, TENANT, **kw)
                    window = {"from": filters.start.isoformat(), "to": filters.end.isoformat()}

                    def sql_once(b=built):
                        client.query(b.sql, parameters=b.params)

                    def http_once(p=path, ps=window | params):
                        http.get(p, params=ps).raise_for_status()

                    # warm caches, as a dashboard polling every few seconds does
                    Timing({}).run(3, sql_once)
                    sql = Timing({"clickhouse": server_pid}).run(args.repeat, sql_once)
                    Timing({}).run(3, http_once)
                    end_to_end = Timing({"clickhouse": server_pid, "api": api.pid}).run(args.repeat, http_once)
                    raw = None
                    if args.raw_repeat:
                        raw_built = build_usage_query(
                            UsageQuery(q.filters, q.group, q.granularity, use_aggregates=False, measures=q.measures),
                            TENANT,
                            **kw,
                        )

                        def raw_once(b=raw_built):
                            client.query(b.sql, parameters=b.params)

                        Timing({}).run(1, raw_once)
                        raw = Timing({"clickhouse": server_pid}).run(args.raw_repeat, raw_once)
                    rows.append((f"{name}, {variant}", sql, end_to_end, raw, reads(client, built)))
                    print(f"  {name}, {variant}: SQL {sql.wall()} ms (ClickHouse CPU {sql.cpu['clickhouse']:.1f} ms), "
                          f"HTTP {end_to_end.wall()} ms", flush=True)  # fmt: skip
    finally:
        api.terminate()
        api.wait(timeout=30)
        client.close()
    load_after = os.getloadavg()

    raw_note = (
        f"{args.raw_repeat} per raw query (after 1)" if args.raw_repeat else "raw baseline skipped (--raw-repeat 0)"
    )
    lines = [
        "## Query API",
        "",
        f"Measured {machine()}; load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} when the timings "
        f"started, {'/'.join(f'{x:.1f}' for x in load_after)} when they ended. Command:",
        f"`.venv/bin/python -m bench.bench_query --events {args.events} --repeat {args.repeat} --raw-repeat {args.raw_repeat} --write-results`.",
        f"Data: {args.events:,} events of the measured tenant over 90 days (+ {sizes.get('usage_events', 0) - args.events:,} of a second tenant), "
        "generated inside the embedded ClickHouse (chDB behind its HTTP interface)"
        + (f" at {rate:,.0f} events/s including the materialized views." if rate else " (reused from an earlier run)."),
        "Rows (parts) per table: "
        + ", ".join(f"{t} {n:,} ({parts.get(t, 0)})" for t, n in sorted(sizes.items()) if t.startswith("usage_"))
        + f"; background {settled}.",
        "Ranges: the last 90 days as the dashboard sends them with day buckets (whole UTC days through today), and "
        "with ragged millisecond ends as any API caller may send (whole days, then hours, minutes and sub-minute "
        "raw edges at both ends).",
        "",
        "| query | SQL wall p50 / p95 (ms) | ClickHouse CPU per query (ms) | HTTP API wall p50 / p95 (ms) "
        "| per API request, CPU of ClickHouse / of the API (ms) | raw events: wall p50 / p95 (ms), CPU (ms) "
        "| raw / aggregate (p50) | read by ClickHouse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, sql, end_to_end, raw, read in rows:
        raw_cells = "skipped | –"
        if raw is not None:
            raw_cells = f"{raw.wall()}, {raw.cpu['clickhouse']:.0f} | {percentiles(raw.samples)[0] / percentiles(sql.samples)[0]:.0f}x"
        lines.append(
            f"| {name} | {sql.wall()} | {sql.cpu['clickhouse']:.1f} | {end_to_end.wall()} "
            f"| {end_to_end.cpu['clickhouse']:.1f} / {end_to_end.cpu['api']:.1f} | {raw_cells} | {read} |"
        )
        if "Europe/Berlin" not in name:
            h95 = percentiles(end_to_end.samples)[1]
            verdicts.append(f"{name} {'PASS' if h95 <= TARGET_P95_MS else 'FAIL'} (HTTP p95 {h95:.1f} ms)")
    lines += [
        "",
        f"- Target p95 ≤ {TARGET_P95_MS:.0f} ms through the API: " + "; ".join(verdicts) + ".",
        f"- {args.repeat} timed runs per aggregate query and per API request (after 3 warm-up runs each), {raw_note}.",
        "- CPU per query: user+system CPU time of the embedded ClickHouse process (and of the query API process) over "
        "the timed runs, divided by the runs; unlike wall-clock time it does not grow with other processes' load.",
        "- Read by ClickHouse: the tables, or projections (`without_user`, migration 0008), in the query's plan.",
        "",
    ]
    return "\n".join(lines)


def queries(filters: Filters) -> dict[str, tuple[UsageQuery, dict, str, dict]]:
    """name -> (query, build options, API path, API parameters)"""
    berlin = Filters(filters.start, filters.end, ZoneInfo("Europe/Berlin"))
    return {
        "overview": (UsageQuery(filters, measures=OVERVIEW_MEASURES), {}, "/v1/analytics/overview", {}),
        "timeseries (day, 90 days)": (
            UsageQuery(filters, granularity="day"),
            {},
            "/v1/analytics/timeseries",
            {"granularity": "day"},
        ),
        "breakdown by agent": (
            UsageQuery(filters, group=GroupBy(dimension="agent")),
            {"order_by": "cost_nanos DESC, group_key ASC", "limit": 100},
            "/v1/analytics/breakdown",
            {"by": "agent", "limit": 100},
        ),
        # not a target: days in a zone with DST come from the hourly table (24x the rows)
        "timeseries (day, 90 days, Europe/Berlin)": (
            UsageQuery(berlin, granularity="day"),
            {},
            "/v1/analytics/timeseries",
            {"granularity": "day", "tz": "Europe/Berlin"},
        ),
    }


if __name__ == "__main__":
    main()
