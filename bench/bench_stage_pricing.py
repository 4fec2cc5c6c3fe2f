"""Pricing stage throughput: usage.raw -> `spendstream processors --stages pricing` -> usage.priced.

    .venv/bin/python -m bench.bench_stage_pricing [--events 200000] [--per-record 50 10 1] [--write-results]

A fresh embedded broker (4 partitions) and ClickHouse (price overrides) per run. The raw topic is
loaded first with ``--events`` events as gateway envelopes of ``--per-record`` events (one
tenant, 20 projects, five models), then the stage worker starts and prices the backlog with the
default settings. Rate = events / (time of the last priced record - time the worker reported
ready), i.e. consume + dedupe + price + produce (zstd) + table changelog, through the broker.
The stage's and the broker's CPU time is read from /proc and printed per event (the box is
shared: judge by those). ``--write-results`` replaces the "Pricing stage"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from stage_support import StageWorker, make_event, produce, raw_record, read_topic

from bench.stage_bench import cpu_seconds, embedded_stack, machine, replace_section
from spendstream.topics import USAGE_PRICED, USAGE_RAW

SECTION = "Pricing stage"
TARGET = 30_000
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-3-5-sonnet-20241022"), ("google", "gemini-1.5-pro"),
          ("openai", "gpt-4o-mini"), ("mistral", "mistral-large-latest")]  # fmt: skip


def raw_backlog(events: int, per_record: int) -> list[tuple[bytes, bytes]]:
    records = []
    for start in range(0, events, per_record):
        project = f"proj-{start // per_record % 20}"
        batch = []
        for i in range(start, min(start + per_record, events)):
            provider, model = MODELS[i % len(MODELS)]
            batch.append(make_event(f"bench-{i}", project, i, provider=provider, model=model))
        records.append(raw_record("bench", project, batch))
    return records


def run(events: int, per_record: int) -> dict:
    with embedded_stack() as stack:
        settings = stack.settings
        records = raw_backlog(events, per_record)
        asyncio.run(produce(settings, USAGE_RAW.name, records))
        worker = StageWorker(settings, "pricing", stack.work)
        try:
            worker.wait_healthy(120)
            ready = time.time()
            cpu0, broker0 = cpu_seconds(worker.proc.pid), cpu_seconds(stack.broker.pid)
            while worker.metrics().get("spendstream_pricing_records_total", 0) < len(records):
                assert worker.alive(), worker.log_tail()
                time.sleep(0.2)
            cpu, broker_cpu = cpu_seconds(worker.proc.pid) - cpu0, cpu_seconds(stack.broker.pid) - broker0
            metrics = worker.metrics()
        finally:
            worker.stop()
        priced = asyncio.run(read_topic(settings, USAGE_PRICED.name, lambda rs: len(rs) >= len(records), timeout=300))
        last = max(r.timestamp for r in priced) / 1000
        assert sum(1 for _ in priced) == len(records)
        assert metrics['spendstream_pricing_events_total{outcome="priced"}'] == events
        seconds = last - ready
        return {"events": events, "per_record": per_record, "records": len(records), "seconds": seconds,
                "rate": events / seconds, "cpu": cpu, "broker_cpu": broker_cpu}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--per-record", type=int, nargs="+", default=[50, 10, 1])
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    results = []
    for per_record in args.per_record:
        # single-event records are bounded by Kafka's per-message cost: a smaller backlog suffices
        n = args.events if per_record >= 10 else min(args.events, 50_000)
        result = run(n, per_record)
        print(result, flush=True)
        print(
            f"{per_record} events per record: events/s (wall) {result['rate']:,.0f}; CPU µs per event:"
            f" stage {result['cpu'] / n * 1e6:.1f}, broker {result['broker_cpu'] / n * 1e6:.1f}",
            flush=True,
        )
        results.append(result)
    lines = [
        f"## {SECTION}",
        "",
        f"Measured {machine()}, with `.venv/bin/python -m bench.bench_stage_pricing"
        f" --events {args.events} --per-record {' '.join(map(str, args.per_record))}`.",
        "One worker (`spendstream processors --stages pricing`, default settings: batches of 500 records / 0.2 s)"
        " on the embedded broker (4 partitions), pricing a backlog already in usage.raw.",
        "",
        "| events per raw record | events | records | seconds | events/s | stage CPU s | events per stage CPU s"
        " | CPU µs per event: stage | broker |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['per_record']} | {r['events']:,} | {r['records']:,} | {r['seconds']:.2f} | {r['rate']:,.0f} | {r['cpu']:.1f}"
            f" | {r['events'] / r['cpu']:,.0f} | {r['cpu'] / r['events'] * 1e6:.1f} | {r['broker_cpu'] / r['events'] * 1e6:.1f} |"
            for r in results
        ),  # fmt: skip
        "",
        f"- Target ≥ {TARGET:,} events/s (batched envelopes): "
        + ("**PASS**" if max(r["rate"] for r in results) >= TARGET else "**FAIL**")
        + f" at {max(r['per_record'] for r in results)} events per record.",
        "- CPU columns: time used by the stage process and the Tansu broker while the backlog was priced;"
        " events per stage CPU second is what one dedicated core would sustain.",
        "- Single-event records pay Kafka's per-message cost (consume, one priced record out each):"
        " the gateway coalesces requests per project into envelopes, so that row is the floor, not the norm.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_results:
        replace_section(SECTION, report)


if __name__ == "__main__":
    main()
