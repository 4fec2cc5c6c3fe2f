"""In-process CPU per span of the OTLP handler's own work against CPU per event of the event API's.

    .venv/bin/python -m bench.otlp_cpu [--batch 512] [--reps 40] [--rounds 5]

No server, no broker: what ``POST /otlp/v1/traces`` does with a protobuf body between reading it
and publishing (decode, map, project rules, validation into ``Event`` structs, with the cyclic GC
paused as the handler does) and what ``POST /v1/events`` does with a JSON body in the same place
(``validate_body``), on the bodies ``bench.bench_otlp`` sends. CPU time (``time.process_time``),
so other jobs on a shared machine do not inflate it; the two are measured in alternation and the
median of the rounds is reported. The whole-gateway figures (HTTP, publishing) are bench_otlp's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.bench_gateway import make_event  # noqa: E402
from bench.bench_otlp import otlp_body  # noqa: E402
from ingest_gateway import logic  # noqa: E402
from ingest_gateway.routers import otlp  # noqa: E402
from spendstream.project_mappings import RuleSet  # noqa: E402


def _otlp_handler(rules: RuleSet, default_project: str, max_spans: int):
    """The handler's inline work on one body (``otlp.map_and_validate`` when it exists)."""
    if hasattr(otlp, "map_and_validate"):

        def run(body: bytes) -> int:
            _, result = otlp.map_and_validate(body, False, False, max_spans, rules, default_project)
            return result.accepted

        return run

    def run_old(body: bytes) -> int:  # the handler as it was (main before this harness)
        mapped = otlp._decode_and_map(body, False, False, max_spans)
        for ev in mapped.events:
            if "project" not in ev:
                ev["project"] = (
                    rules.project_for(ev.get("agent", "default"), ev.get("session_label")) or default_project
                )
        result = logic.validate_objects(mapped.events, logic.RequestContext.now())
        mapped.events.clear()
        return result.accepted

    return run_old


def _measure(fn, bodies: list[bytes], reps: int) -> float:
    """CPU seconds for ``reps`` passes over ``bodies`` (GC paused, as the handlers run inline)."""
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        for _ in range(reps):
            for body in bodies:
                fn(body)
        return time.process_time() - start
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=40, help="passes over the 8 bodies per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rules = RuleSet([])
    otlp_bodies = [otlp_body(args.batch, i) for i in range(8)]
    event_bodies = [orjson.dumps([make_event(i * args.batch + j) for j in range(args.batch)]) for i in range(8)]
    run_otlp = _otlp_handler(rules, "default", 10_000)

    def run_events(body: bytes) -> int:
        return logic.validate_body(body, False, 10_000, logic.RequestContext.now()).accepted

    assert run_otlp(otlp_bodies[0]) == args.batch, "every span must become an event"
    assert run_events(event_bodies[0]) == args.batch
    n = args.reps * len(otlp_bodies) * args.batch
    per_span, per_event = [], []
    for _ in range(args.rounds):
        per_span.append(_measure(run_otlp, otlp_bodies, args.reps) / n * 1e6)
        per_event.append(_measure(run_events, event_bodies, args.reps) / n * 1e6)
    span_us, event_us = statistics.median(per_span), statistics.median(per_event)
    print(
        f"otlp handler: {span_us:.2f} us/span ({', '.join(f'{x:.2f}' for x in per_span)}); "
        f"event API handler: {event_us:.2f} us/event ({', '.join(f'{x:.2f}' for x in per_event)}); "
        f"ratio {span_us / event_us:.2f}"
    )


if __name__ == "__main__":
    main()
