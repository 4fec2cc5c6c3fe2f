"""Re-pricing throughput: events written straight to ClickHouse, then one job re-prices them all.

    .venv/bin/python -m bench.bench_repricing [--events 10000000] [--batch 5000] [--write-results]

A fresh embedded ClickHouse and migrated database; ``--events`` events of a model without a price
over 30 days are inserted straight into ``usage_events`` (``INSERT ... SELECT FROM numbers()``, as
the sink would have stored them: ``unknown_model``, cost 0; the views fill every aggregate); an
override effective from the first day is added; then a dry run and an apply of the whole range
(``repricing.batch_events`` = ``--batch``) are timed, and the totals of every aggregate checked
against usage_events. Prints events/s of each; ``--write-results`` replaces the "Re-pricing"
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

from bench.stage_bench import embedded_stack, machine, replace_section
from spendstream.clickhouse import get_client
from spendstream.pricing import default_catalog
from spendstream.repricing import jobs, store
from spendstream.repricing.planner import Scope

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 30


def load(client, events: int) -> None:
    step_ms = DAYS * 86_400_000 // max(events, 1)
    client.command(
        "INSERT INTO usage_events (tenant, project, agent, user, provider, model, input_tokens, output_tokens, "
        "pricing_status, price_source, status, event_id, timestamp, received_at) "
        "SELECT 'bench', 'p', concat('agent-', toString(number % 7)), concat('user-', toString(number % 50)), "
        "'acme', 'mystery-1', 1000 + number % 977, 100 + number % 97, 'unknown_model', 'none', 'ok', "
        f"concat('e', toString(number)), toDateTime64('{START:%Y-%m-%d %H:%M:%S}', 3, 'UTC') + "
        f"toIntervalMillisecond(number * {step_ms}), now64(3) FROM numbers({events})",
        settings={"max_insert_block_size": 100_000},
    )
    client.insert(
        "price_overrides",
        [["bench", "ov", "acme", "mystery-1", START, 1.25, 10, START, 0, 1]],
        column_names=["tenant", "id", "provider", "model", "effective_from", "input_mtok", "output_mtok",
                      "created_at", "deleted", "version"],
    )  # fmt: skip


class Progress:
    """Events done, events/s and the time left, on stderr at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int, every_s: float = 5.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s or done >= self.total:
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            left = (self.total - done) / rate if rate else float("inf")
            print(f"  {self.what}: {done:,}/{self.total:,} events, {rate:,.0f}/s, ~{left:.0f} s left",
                  file=sys.stderr, flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    catalog = default_catalog()
    with embedded_stack() as stack:
        client = get_client(stack.settings)
        t0 = time.perf_counter()
        load(client, args.events)
        print(f"  loaded {args.events:,} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        scope = Scope("bench", START, START + timedelta(days=DAYS + 1))
        t0 = time.perf_counter()
        dry_progress = Progress("dry run", args.events)
        diff = jobs.dry_run(
            client, catalog, scope, batch_events=args.batch, sample_size=5,
            progress=lambda d: dry_progress(d.events_scanned),
        )  # fmt: skip
        dry_s = time.perf_counter() - t0
        job = store.Job("bench", jobs.new_job_id(), actor="bench", reason="bench", scope=scope.describe())
        t0 = time.perf_counter()
        apply_progress = Progress("apply", args.events)
        job = jobs.run(
            client, catalog, job, batch_events=args.batch, sample_size=5,
            after_batch=lambda j: apply_progress(j.diff["events_scanned"]), scan_client=get_client(stack.settings),
        )  # fmt: skip
        apply_s = time.perf_counter() - t0
        raw = client.query("SELECT sum(cost_nanos) FROM usage_events").result_rows[0][0]
        daily = client.query("SELECT sum(cost_nanos) FROM usage_daily").result_rows[0][0]
        assert raw == daily == diff.new_nanos == job.diff["new_nanos"], (raw, daily, diff.new_nanos)
        client.close()
    report = (
        "## Re-pricing\n\n"
        f"Measured {machine()} with `.venv/bin/python -m bench.bench_repricing --events {args.events} "
        f"--batch {args.batch}`.\n\n"
        "| what | seconds | events/s |\n|---|---|---|\n"
        f"| dry run ({diff.events_changed} events changed) | {dry_s:.1f} | {args.events / dry_s:,.0f} |\n"
        f"| apply ({job.batches} batches) | {apply_s:.1f} | {args.events / apply_s:,.0f} |\n"
    )
    print(report)
    if args.write_results:
        replace_section("Re-pricing", report)


if __name__ == "__main__":
    main()
