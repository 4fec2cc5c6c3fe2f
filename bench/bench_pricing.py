"""Pure pricing benchmark: spendstream's price() against genai-prices' calc_price, same events, same run.

    .venv/bin/python -m bench.bench_pricing [--seconds 3] [--write-results]

Events: tests/fixtures/pricing_corpus.ndjson (the corpus mix: every provider, cache, reasoning,
audio, tiers, price changes, name forms, client-priced and unknown models). The process pins
itself to one CPU. ``price()`` runs over the whole corpus in rounds with a warm catalog (start-up
compilation and name resolution are reported separately); calc_price runs on the catalog-priced
events with the reference names, including building its ``Usage``, as a caller has to.
``--write-results`` replaces the "Pricing (pure)" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genai_prices import __version__ as genai_prices_version  # noqa: E402
from genai_prices import calc_price  # noqa: E402

from spendstream.pricing import load_catalog, price  # noqa: E402
from tests.fixtures.make_pricing_corpus import genai_usage  # noqa: E402

CORPUS = ROOT / "tests" / "fixtures" / "pricing_corpus.ndjson"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Pricing (pure)"
TARGET_US = 5.0


def pin_to_one_cpu() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def rounds_per_event_us(work, events: list, seconds: float) -> list[float]:
    """Per-event microseconds of each full pass over ``events`` until ``seconds`` have passed."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter_ns()
        work(events)
        samples.append((time.perf_counter_ns() - start) / len(events) / 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per measured function")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()

    cpu = pin_to_one_cpu()
    events = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]

    start = time.perf_counter()
    catalog = load_catalog()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for event in events:  # first sight of every name: resolution, then memoised
        price(event, catalog)
    first_pass_us = (time.perf_counter() - start) / len(events) * 1e6

    def run_price(batch: list) -> None:
        for event in batch:
            price(event, catalog)

    referenced = [e for e in events if "corpus.ref_model" in e["tags"]]
    calc_inputs = [
        (e, e["tags"]["corpus.ref_model"], e["tags"]["corpus.ref_provider"], datetime.fromisoformat(e["timestamp"]))
        for e in referenced
    ]

    def run_calc(batch: list) -> None:
        for event, model, provider, at in batch:
            calc_price(genai_usage(event), model, provider_id=provider, genai_request_timestamp=at)

    run_calc(calc_inputs)  # warm genai-prices' own lookup cache
    price_samples = rounds_per_event_us(run_price, events, args.seconds)
    calc_samples = rounds_per_event_us(run_calc, calc_inputs, args.seconds)

    price_median = statistics.median(price_samples)
    calc_median = statistics.median(calc_samples)
    statuses = {}
    for event in events:
        line = price(event, catalog)
        statuses[line.pricing_status] = statuses.get(line.pricing_status, 0) + 1
    verdict = "PASS" if price_median <= TARGET_US else "FAIL"
    command = ".venv/bin/python -m bench.bench_pricing"
    if args.seconds != 3.0:
        command += f" --seconds {args.seconds:g}"
    lines = [
        SECTION,
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}`",
        f"(Python {platform.python_version()}, genai-prices {genai_prices_version}, {os.cpu_count()} cores"
        f" shared with other work, load average {os.getloadavg()[0]:.1f} at the end; process pinned to CPU {cpu}).",
        f"Events: tests/fixtures/pricing_corpus.ndjson, {len(events)} events ("
        + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        + ").",
        "",
        "| what | per event (median of passes) | best pass | events/s (median) |",
        "|---|---|---|---|",
        f"| `price()` over the corpus mix, warm catalog | {price_median:.2f} µs | {min(price_samples):.2f} µs"
        f" | {1e6 / price_median:,.0f} |",
        f"| genai-prices `calc_price` (+ `Usage`), {len(calc_inputs)} catalog-priced events | {calc_median:.1f} µs"
        f" | {min(calc_samples):.1f} µs | {1e6 / calc_median:,.0f} |",
        "",
        f"- `price()` is {calc_median / price_median:.0f}x faster than calc_price; target ≤ {TARGET_US:g} µs/event"
        f" (≥ 200k events/s): **{verdict}**.",
        f"- Start-up: catalog compilation {compile_s * 1000:.0f} ms (genai-prices data already imported);"
        f" first pass with cold name resolution {first_pass_us:.1f} µs/event.",
        f"- Passes: {len(price_samples)} of price(), {len(calc_samples)} of calc_price.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_results:
        write_section(report)
        print(f"updated {RESULTS}")


def write_section(report: str) -> None:
    """Replace this benchmark's section, keeping every other section as it is."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        following = rest.find("\n## ")
        tail = rest[following + 1 :] if following >= 0 else ""
        text = head + report + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + report
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
