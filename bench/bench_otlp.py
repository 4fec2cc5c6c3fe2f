"""OTLP benchmark: spans/s through ``POST /otlp/v1/traces`` (protobuf, batches of 512 spans) against
events/s through ``POST /v1/events`` (JSON, batches of 512 events) on the same gateway.

    .venv/bin/python -m bench.bench_otlp [--duration 5] [--rounds 3] [--batch 512] [--workers 2]

Target (issue 19): OTLP spans/s >= 50 % of the event API's events/s for the same batch size.
Each span is a semconv chat span (gen_ai.* attributes, cache read, agent name, a tag) under a
resource, as the contrib OpenAI instrumentation writes it; every span is a model call, so each
becomes one event. Reuses bench_gateway's harness: ``wrk`` in its own process (bodies read from
files by its Lua script, binary-safe), the gateway as ``spendstream gateway`` on its own embedded
broker, CPU seconds per span/event of the gateway, wrk and the broker. The two endpoints are
loaded in alternation (OTLP, events, events, OTLP, ...) so that load from other jobs on the shared
machine hits both alike; the verdict is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench.bench_gateway import ADMIN_KEY, count_on_topic, ensure_wrk, make_event, server, wrk  # noqa: E402
from spendstream.embedded.kafka import EmbeddedKafka  # noqa: E402
from spendstream.ports import free_port  # noqa: E402

LUA = r"""
local bodies = {}
init = function(args)
  for path in io.lines(args[1]) do
    local f = io.open(path, "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
  i = 0
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "PATH", {["Content-Type"] = "TYPE", ["Authorization"] = "Bearer KEY"}, bodies[i])
end
"""


def otlp_body(batch: int, seed: int, unique_response_ids: bool = False) -> bytes:
    """``unique_response_ids``: each span its own ``gen_ai.response.id``, as real calls have (the
    default repeats one, so every attribute encoding recurs across the bodies)."""
    from otel_support import export, semconv_chat, span

    now_ns = time.time_ns()
    spans = [
        span(
            "chat gpt-4o-mini",
            semconv_chat(
                "gpt-4o-mini",
                **{
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.usage.input_tokens": 1000 + (seed * batch + j) % 5000,
                    "gen_ai.usage.cache_read.input_tokens": j % 900,
                    "gen_ai.agent.name": f"agent-{j % 25}",
                    "gen_ai.conversation.id": f"s-{j % 1000}",
                    "spendstream.tag.team": f"team-{j % 4}",
                    **({"gen_ai.response.id": f"chatcmpl-{seed}-{j}-{now_ns}"} if unique_response_ids else {}),
                },
            ),
            start_ns=now_ns - 2_000_000_000,
        )
        for j in range(batch)
    ]
    return export(spans, {"service.name": "bench", "spendstream.project": f"project-{seed % 3}"}).SerializeToString()


def write_bodies(work: Path, name: str, bodies: list[bytes]) -> Path:
    listing = work / f"{name}.list"
    paths = []
    for i, body in enumerate(bodies):
        path = work / f"{name}-{i}.bin"
        path.write_bytes(body)
        paths.append(str(path))
    listing.write_text("\n".join(paths) + "\n")
    return listing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement round")
    ap.add_argument("--rounds", type=int, default=3, help="OTLP/events pairs; medians are reported")
    ap.add_argument("--batch", type=int, default=512, help="spans (events) per request")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="gateway processes")
    ap.add_argument(
        "--unique-response-ids",
        action="store_true",
        help="a gen_ai.response.id per span, as real calls have (64 bodies: an id recurs only every 32,768 spans)",
    )
    args = ap.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-otlp-"))
    scripts = {}
    for name, path, ctype in (("otlp", "/otlp/v1/traces", "application/x-protobuf"),
                              ("events", "/v1/events", "application/json")):  # fmt: skip
        script = work / f"{name}.lua"
        script.write_text(LUA.replace("PATH", path).replace("TYPE", ctype).replace("KEY", ADMIN_KEY))
        scripts[name] = script
    bodies = {
        "otlp": write_bodies(
            work,
            "otlp",
            [otlp_body(args.batch, i, args.unique_response_ids) for i in range(64 if args.unique_response_ids else 32)],
        ),
        "events": write_bodies(
            work,
            "events",
            [orjson.dumps([make_event(i * args.batch + j) for j in range(args.batch)]) for i in range(32)],
        ),
    }
    results: dict[str, list[dict]] = {"otlp": [], "events": []}
    load_at_start = os.getloadavg()[0]
    with EmbeddedKafka(log_path=work / "tansu.log") as broker:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "SPENDSTREAM_KAFKA__PROFILE": "embedded",
            "SPENDSTREAM_CLICKHOUSE__URL": "http://127.0.0.1:1",
            "SPENDSTREAM_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            "SPENDSTREAM_GATEWAY__PORT": str(port),
            "SPENDSTREAM_GATEWAY__WORKERS": str(args.workers),
            "SPENDSTREAM_LOG_LEVEL": "WARNING",
        }
        cmd = [sys.executable, "-m", "spendstream.cli", "gateway"]
        with server(cmd, env, port, work / "gateway.log") as (url, pid):
            for name in ("otlp", "events"):  # warm-up
                wrk(url, scripts[name], bodies[name], args.connections, 2, pid, broker.pid or 0)
            for pair in range(args.rounds):
                order = ("otlp", "events") if pair % 2 == 0 else ("events", "otlp")
                for name in order:
                    r = wrk(url, scripts[name], bodies[name], args.connections, args.duration, pid, broker.pid or 0)
                    r["per_s"] = (r["requests"] - r["non_2xx"]) * args.batch / r["seconds"]
                    results[name].append(r)
        records, events = asyncio.run(count_on_topic(broker.bootstrap))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ratios = [o["per_s"] / e["per_s"] for o, e in zip(results["otlp"], results["events"])]
    print(
        f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}; rounds of {args.duration:.0f} s"
    )
    for name, unit in (("otlp", "spans"), ("events", "events")):
        print(
            f"{name}: batch {args.batch}, {args.workers} workers, {args.connections} connections: "
            f"{med(name, 'per_s'):,.0f} {unit}/s, p50 {med(name, 'p50_ms'):.1f} ms, p99 {med(name, 'p99_ms'):.1f} ms, "
            f"non-2xx {sum(r['non_2xx'] for r in results[name])}; CPU us/{unit[:-1]}: gateway "
            f"{med(name, 'cpu_us_per_request') / args.batch:.2f}, wrk {med(name, 'client_cpu_us_per_request') / args.batch:.2f}, "
            f"broker {med(name, 'broker_cpu_us_per_request') / args.batch:.2f}"
        )
    print(
        f"otlp/events per pair: {', '.join(f'{x:.2f}' for x in ratios)}; MEDIAN {statistics.median(ratios):.2f} (target >= 0.50)"
    )
    print(f"usage.raw afterwards: {records:,} records, {events:,} events")


if __name__ == "__main__":
    main()
