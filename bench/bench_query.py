"""Query API benchmark: analytics answered from the aggregates vs the same queries on raw events.

    .venv/bin/python -m bench.bench_query [--events 100000000] [--data-dir /tmp/spendstream-bench-query]
                                          [--repeat 40] [--raw-repeat 5] [--write-results]

Generates ``--events`` usage events straight into ClickHouse (``INSERT ... SELECT FROM numbers()``
in batches; the materialized views fill the aggregates as in production) over 90 days for one
tenant, plus 10 % as many for a second tenant, in an embedded ClickHouse whose data directory is
kept, so a second run with the same size reuses it. Then it times, for the dashboard's 90-day range
(with ragged, non-aligned ends, as "now - 90 days" gives):

- overview, timeseries (day, UTC), breakdown by agent, as SQL built by ``query_api.usage_sql``
  and run through clickhouse-connect (what the API's handlers wait for), and end to end through
  the HTTP API (uvicorn in this process, httpx client);
- the same three queries forced onto ``usage_events`` (raw), for the ratio.

``--write-results`` replaces the "Query API" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
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

from bench.stage_bench import machine, replace_section  # noqa: E402
from query_api.filters import Filters  # noqa: E402
from query_api.usage_sql import OVERVIEW_MEASURES, GroupBy, UsageQuery, build_usage_query  # noqa: E402
from query_api_stack import QueryApiServer, migrate  # noqa: E402
from spendstream.clickhouse import get_client  # noqa: E402
from spendstream.embedded.clickhouse import EmbeddedClickHouse  # noqa: E402
from spendstream.embedded.kafka import free_port  # noqa: E402
from spendstream.settings import Settings  # noqa: E402

TENANT, NOISE = "bench", "noise"
DATA_END = datetime(2024, 6, 30, tzinfo=UTC)
SPAN = timedelta(days=90)
BATCH = 5_000_000
TARGET_P95_MS = 100.0
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
        dsn=settings.clickhouse_url, database=settings.clickhouse.database, autogenerate_session_id=False,
        send_receive_timeout=3600,
    )
    try:
        have = client.query("SELECT count() FROM usage_events WHERE tenant = {t:String}", parameters={"t": tenant}).result_rows[0][0]
        if have >= total:
            return 0.0
        if have % BATCH:
            raise SystemExit(f"{tenant} has {have} events, not a whole number of batches: use a fresh --data-dir")
        started, first = time.monotonic(), have
        start_ms = int((DATA_END - SPAN).timestamp() * 1000)
        while first < total:
            count = min(BATCH, total - first)
            client.command(GENERATOR, parameters={
                "tenant": tenant, "start_ms": start_ms, "span_ms": int(SPAN.total_seconds() * 1000), "total": total,
                "salt": salt, "first": first, "count": count,
            }, settings={"max_insert_threads": 2})
            first += count
            rate = (first - have) / (time.monotonic() - started)
            print(f"  {tenant}: {first:,}/{total:,} events ({rate:,.0f}/s)", flush=True)
        return (total - have) / (time.monotonic() - started)
    finally:
        client.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def time_sql(client, q: UsageQuery, repeat: int, server_pid: int, **kw) -> tuple[list[float], float, list[str]]:
    """Wall-clock ms of each run, and the ClickHouse server's CPU ms per run (load-independent)."""
    built = build_usage_query(q, TENANT, **kw)
    samples = []
    cpu_before = cpu_ms(server_pid)
    for _ in range(repeat):
        t = time.perf_counter()
        client.query(built.sql, parameters=built.params)
        samples.append((time.perf_counter() - t) * 1000)
    return samples, (cpu_ms(server_pid) - cpu_before) / repeat, built.tables


def time_http(http: httpx.Client, path: str, params: dict, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        http.get(path, params=params).raise_for_status()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000_000, help="events of the measured tenant")
    parser.add_argument("--data-dir", default="/tmp/spendstream-bench-query", help="kept between runs")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--raw-repeat", type=int, default=5)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    data_dir = Path(args.data_dir) / f"events-{args.events}"
    clickhouse = EmbeddedClickHouse(path=str(data_dir / "chdb")).start()
    try:
        settings = Settings(
            clickhouse={"url": clickhouse.url, "database": "bench"}, bootstrap_admin_key=ADMIN_KEY,
            bootstrap_tenant=TENANT, query_api={"port": free_port()}, data_dir=str(data_dir),
        )
        migrate(settings)
        print(f"generating into {data_dir} ...", flush=True)
        rate = generate(settings, TENANT, args.events, salt=0)
        generate(settings, NOISE, max(BATCH, args.events // 10 // BATCH * BATCH), salt=1_000_000_007)
        report = measure(settings, args, rate, clickhouse.pid)
    finally:
        clickhouse.stop()
    print(report)
    if args.write_results:
        replace_section("Query API", report)
        print("updated bench/RESULTS.md")


def measure(settings: Settings, args: argparse.Namespace, rate: float, server_pid: int) -> str:
    load_before = os.getloadavg()[0]
    client = get_client(settings)
    sizes = dict(client.query(
        "SELECT table, sum(rows) FROM system.parts WHERE database = 'bench' AND active GROUP BY table"
    ).result_rows)
    now = DATA_END - timedelta(minutes=7, seconds=12, milliseconds=345)
    next_minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    ranges = {
        # what the dashboard sends for "last 90 days": from a day start to the next whole minute
        "dashboard range": Filters(start=(next_minute - SPAN).replace(hour=0, minute=0), end=next_minute, tz=ZoneInfo("UTC")),
        # an API caller's now - 90 days: ragged ends down to the millisecond (raw edges)
        "ragged ends": Filters(start=now - SPAN, end=now, tz=ZoneInfo("UTC")),
    }
    rows = []
    with QueryApiServer(settings) as server, server.client(ADMIN_KEY) as http:
        for variant, filters in ranges.items():
            berlin = Filters(filters.start, filters.end, ZoneInfo("Europe/Berlin"))
            queries = {
                "overview": (UsageQuery(filters, measures=OVERVIEW_MEASURES), {}, "/v1/analytics/overview", {}),
                "timeseries (day, 90 days)": (
                    UsageQuery(filters, granularity="day"), {}, "/v1/analytics/timeseries", {"granularity": "day"},
                ),
                "breakdown by agent": (
                    UsageQuery(filters, group=GroupBy(dimension="agent")),
                    {"order_by": "cost_nanos DESC, group_key ASC", "limit": 100},
                    "/v1/analytics/breakdown", {"by": "agent", "limit": 100},
                ),
                # not a target: days in a zone with DST come from the hourly table (24x the rows)
                "timeseries (day, 90 days, Europe/Berlin)": (
                    UsageQuery(berlin, granularity="day"), {}, "/v1/analytics/timeseries",
                    {"granularity": "day", "tz": "Europe/Berlin"},
                ),
            }
            window = {"from": filters.start.isoformat(), "to": filters.end.isoformat()}
            for name, (q, kw, path, params) in queries.items():
                time_sql(client, q, 3, server_pid, **kw)  # warm caches, as a dashboard polling every few seconds does
                agg, agg_cpu, tables = time_sql(client, q, args.repeat, server_pid, **kw)
                api = time_http(http, path, window | params, args.repeat)
                raw_q = UsageQuery(q.filters, q.group, q.granularity, use_aggregates=False, measures=q.measures)
                time_sql(client, raw_q, 1, server_pid, **kw)
                raw, raw_cpu, _ = time_sql(client, raw_q, args.raw_repeat, server_pid, **kw)
                rows.append((f"{name}, {variant}", percentiles(agg), agg_cpu, percentiles(api), percentiles(raw), raw_cpu,
                             sorted(set(tables))))  # fmt: skip
                print(f"  {name}, {variant}: done", flush=True)
    client.close()

    lines = [
        "## Query API",
        "",
        f"Measured {machine()}; load average {load_before:.1f} when the timings started. Command:",
        f"`.venv/bin/python -m bench.bench_query --events {args.events} --repeat {args.repeat} --raw-repeat {args.raw_repeat} --write-results`.",
        f"Data: {args.events:,} events of the measured tenant over 90 days (+ {sizes.get('usage_events', 0) - args.events:,} of a second tenant), "
        "generated inside the embedded ClickHouse (chDB behind its HTTP interface)"
        + (f" at {rate:,.0f} events/s including the materialized views." if rate else " (reused from an earlier run)."),
        "Rows per table: " + ", ".join(f"{t} {n:,}" for t, n in sorted(sizes.items()) if t.startswith("usage_")) + ".",
        "Ranges: the last 90 days as the dashboard sends them (from a day start to the next whole minute: whole days, "
        "then hours and minutes of today), and with ragged millisecond ends as any API caller may send "
        "(adds raw edges below a minute).",
        "",
        "| query | SQL p50 / p95 (ms) | ClickHouse CPU per query (ms) | HTTP API p50 / p95 (ms) "
        "| raw events: p50 / p95 (ms), CPU (ms) | raw / aggregate (p50) | tables |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, (a50, a95), a_cpu, (h50, h95), (r50, r95), r_cpu, tables in rows:
        lines.append(
            f"| {name} | {a50:.1f} / {a95:.1f} | {a_cpu:.1f} | {h50:.1f} / {h95:.1f} | {r50:.0f} / {r95:.0f}, {r_cpu:.0f} "
            f"| {r50 / a50:.0f}x | {', '.join(tables)} |"
        )
        if "Europe/Berlin" not in name:
            verdicts.append(f"{name} {'PASS' if h95 <= TARGET_P95_MS else 'FAIL'} (HTTP p95 {h95:.1f} ms)")
    lines += [
        "",
        f"- Target p95 ≤ {TARGET_P95_MS:.0f} ms through the API: " + "; ".join(verdicts) + ".",
        f"- {args.repeat} timed runs per aggregate query (after 3 warm-up runs), {args.raw_repeat} per raw query (after 1).",
        "- ClickHouse CPU per query: user+system CPU time of the embedded ClickHouse process over the timed SQL runs, "
        "divided by the runs; unlike wall-clock time it does not grow with other processes' load on the shared box.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
