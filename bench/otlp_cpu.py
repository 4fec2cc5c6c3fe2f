"""In-process CPU per span of the OTLP handler against CPU per event of the event API.

    .venv/bin/python -m bench.otlp_cpu [--batch 512] [--reps 40] [--rounds 5] [--asgi]

No server, no broker. By default: what ``POST /otlp/v1/traces`` does with a protobuf body between
reading it and publishing (decode, map, project rules, validation into ``Event`` structs, with the
cyclic GC paused as the handler does) and what ``POST /v1/events`` does with a JSON body in the
same place (``validate_body``). With ``--asgi``: whole requests through the gateway's ASGI app
(FastAPI routing for OTLP, the pure ASGI handler for events, key check, the answer), publishing
replaced by encoding the events as the publisher does (no Kafka). Both on the bodies
``bench.bench_otlp`` sends. CPU time (``time.process_time``), so other jobs on a shared machine do
not inflate it much; the two are measured in alternation and the median of the rounds is
reported. The whole-gateway figures (HTTP server, Kafka client) are bench_otlp's.
"""

from __future__ import annotations

import argparse
import asyncio
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


class _Keys:
    """A key store that knows one ingest key (the key check itself is not what is measured)."""

    def __init__(self, principal) -> None:
        self.principal = principal

    async def authenticate(self, key: str):
        return self.principal


class _Publisher:
    """Encodes the events as the publisher does before handing them to Kafka; no broker."""

    async def publish(self, tenant: str, received_at: str, by_project: dict, n_events: int) -> None:
        from ingest_gateway.publisher import encode_events

        for events in by_project.values():
            encode_events(events)


def _asgi_handlers(reps: int):
    """(run_otlp, run_events) that post one body through the gateway's ASGI app, in-process."""
    from ingest_gateway.app import create_app
    from ingest_gateway.project_rules import ProjectRules
    from spendstream.keys import Principal
    from spendstream.settings import Settings

    settings = Settings()
    app = create_app(settings)
    app.state.keys = _Keys(Principal("k1", "t1", frozenset({"ingest"})))
    app.state.publisher = _Publisher()
    app.state.project_rules = ProjectRules(settings)
    loop = asyncio.new_event_loop()

    def post(path: str, content_type: bytes, body: bytes) -> int:
        sent: list[dict] = []
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return chunks.pop() if chunks else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"content-type", content_type),
                (b"authorization", b"Bearer ss_bench_key"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000),
        }
        loop.run_until_complete(app(scope, receive, send))
        return sent[0]["status"]

    def run_otlp(body: bytes) -> int:
        assert post("/otlp/v1/traces", b"application/x-protobuf", body) == 200
        return 0

    def run_events(body: bytes) -> int:
        assert post("/v1/events", b"application/json", body) == 202
        return 0

    return run_otlp, run_events


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
    ap.add_argument("--asgi", action="store_true", help="whole requests through the gateway's ASGI app")
    ap.add_argument(
        "--unique-response-ids", action="store_true", help="a gen_ai.response.id per span, as real calls have"
    )
    args = ap.parse_args()
    rules = RuleSet([])
    otlp_bodies = [otlp_body(args.batch, i, args.unique_response_ids) for i in range(8)]
    event_bodies = [orjson.dumps([make_event(i * args.batch + j) for j in range(args.batch)]) for i in range(8)]
    run_otlp = _otlp_handler(rules, "default", 10_000)

    def run_events(body: bytes) -> int:
        return logic.validate_body(body, False, 10_000, logic.RequestContext.now()).accepted

    assert run_otlp(otlp_bodies[0]) == args.batch, "every span must become an event"
    assert run_events(event_bodies[0]) == args.batch
    if args.asgi:
        run_otlp, run_events = _asgi_handlers(args.reps)
        run_otlp(otlp_bodies[0])
        run_events(event_bodies[0])
    n = args.reps * len(otlp_bodies) * args.batch
    per_span, per_event = [], []
    for r in range(args.rounds):
        if args.unique_response_ids:  # no response id seen before: every pass on new bodies
            fresh = [otlp_body(args.batch, 100 + r * 1000 + i, True) for i in range(args.reps * len(otlp_bodies))]
            per_span.append(_measure(run_otlp, fresh, 1) / n * 1e6)
        else:
            per_span.append(_measure(run_otlp, otlp_bodies, args.reps) / n * 1e6)
        per_event.append(_measure(run_events, event_bodies, args.reps) / n * 1e6)
    span_us, event_us = statistics.median(per_span), statistics.median(per_event)
    what = "request" if args.asgi else "handler"
    print(
        f"otlp {what}: {span_us:.2f} us/span ({', '.join(f'{x:.2f}' for x in per_span)}); "
        f"event API {what}: {event_us:.2f} us/event ({', '.join(f'{x:.2f}' for x in per_event)}); "
        f"ratio of medians {span_us / event_us:.2f}, of minima {min(per_span) / min(per_event):.2f}"
    )


if __name__ == "__main__":
    main()
