"""Gateway benchmark: batches of 500 into the embedded broker, and single posts vs a bare FastAPI endpoint.

    .venv/bin/python -m bench.bench_gateway [--duration 5] [--rounds 3] [--single-rounds 7]
                                            [--batch-workers 2] [--single-workers 1]

Needs ``wrk`` (Debian package ``wrk``; installed here when missing and running as root), the load
generator, in its own process with a Lua script that cycles through pre-generated distinct bodies.
Starts its own embedded broker and uvicorn servers (uvloop, httptools, no access log) in separate
processes:

1. the gateway (``spendstream gateway``, bootstrap admin key, no ClickHouse) with
   ``--batch-workers`` processes, loaded with POST bodies of 500 events;
2. the gateway with ``--single-workers`` processes, loaded with single-event bodies, and
3. a bare FastAPI app with as many processes, whose ``POST /v1/events`` reads the body and answers
   a constant 202: the framework's own cost, the ceiling for single posts. 2 and 3 run side by
   side and are loaded in alternation (gateway-bare, then bare-gateway, ...), so that load from
   other jobs on the shared machine hits both alike; the verdict is the median of the per-pair
   ratios.

A request counts only when answered 202, which the gateway does after the broker acknowledged
(acks=all). Afterwards the records on ``spendstream.usage.raw`` are read back and their events
counted. Besides wall-clock rates, CPU time per event/request is reported for each process
involved: the server (all its workers), the load generator (wrk) and the broker. On a machine
shared with other jobs CPU time varies far less than the rates, so speed work is judged by it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.profile import cpu_seconds  # noqa: E402
from spendstream.embedded.kafka import EmbeddedKafka  # noqa: E402
from spendstream.ports import free_port  # noqa: E402

ADMIN_KEY = "bench-admin-key-" + uuid.uuid4().hex
LUA = r"""
local bodies = {}
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = 0
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/events", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer KEY",
  }, bodies[i])
end
"""


def make_event(i: int) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "project": f"project-{i % 3}",
        "agent": f"agent-{i % 25}",
        "user": f"user-{i % 200}",
        "session_id": f"s-{i % 1000}",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 1000 + i % 5000,
        "output_tokens": 200 + i % 700,
        "cache_read_tokens": i % 900,
        "latency_ms": 300 + i % 2000,
        "tags": {"env": "prod", "team": f"team-{i % 4}"},
    }


def write_bodies(path: Path, batch: int, count: int) -> None:
    with path.open("wb") as f:
        for b in range(count):
            events = [make_event(b * batch + j) for j in range(batch)]
            f.write(orjson.dumps(events if batch > 1 else events[0]) + b"\n")


BARE_APP = """
from fastapi import FastAPI, Request, Response
app = FastAPI()
@app.post("/v1/events", status_code=202)
async def events(request: Request) -> Response:
    await request.body()
    return Response(b'{"accepted":1}', status_code=202, media_type="application/json")
"""


def children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children so far (wrk runs are such children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def server(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[tuple[str, int]]:
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code in (200, 404):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(url: str, script: Path, bodies: Path, connections: int, duration: float, pid: int, broker_pid: int) -> dict:
    """One wrk run; CPU seconds per request of the server (all workers), wrk itself and the broker."""
    before = cpu_seconds(pid), children_cpu_seconds(), cpu_seconds(broker_pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url, "--", str(bodies)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    after = cpu_seconds(pid), children_cpu_seconds(), cpu_seconds(broker_pid)
    server_s, client_s, broker_s = (a - b for a, b in zip(after, before))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: _ms(v, unit) for p, v, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    requests, seconds = re.search(r"(\d+) requests in ([\d.]+)s", out).groups()
    requests = int(requests)
    return {
        "requests": requests,
        "seconds": float(seconds),
        "cpu_us_per_request": server_s / requests * 1e6,
        "client_cpu_us_per_request": client_s / requests * 1e6,
        "broker_cpu_us_per_request": broker_s / requests * 1e6,
        "rps": rps,
        "p50_ms": pct.get("50"),
        "p99_ms": pct.get("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def count_on_topic(bootstrap: str) -> tuple[int, int]:
    """(records, events) on usage.raw, reading until the topic is idle (not end_offsets: Tansu bug)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        "spendstream.usage.raw", bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records = events = 0
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=2000, max_records=5000)
            if not batch:
                return records, events
            for msgs in batch.values():
                for m in msgs:
                    records += 1
                    events += len(orjson.loads(m.value)["events"])
    finally:
        await consumer.stop()


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("wrk not found: apt-get install wrk")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the batch scenario; medians are reported")
    ap.add_argument(
        "--single-rounds",
        type=int,
        default=7,
        help="gateway/bare pairs of single-post rounds (order alternating); the median ratio is the verdict",
    )
    ap.add_argument("--batch", type=int, default=500, help="events per batch request")
    ap.add_argument("--connections-batch", type=int, default=8)
    ap.add_argument("--connections-single", type=int, default=64)
    ap.add_argument("--batch-workers", type=int, default=2, help="gateway processes for the batch scenario")
    ap.add_argument("--single-workers", type=int, default=1, help="processes of the gateway AND the bare app")
    args = ap.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    script = work / "post.lua"
    script.write_text(LUA.replace("KEY", ADMIN_KEY))
    batch_bodies, single_bodies = work / "batch.ndjson", work / "single.ndjson"
    write_bodies(batch_bodies, args.batch, 64)
    write_bodies(single_bodies, 1, 5000)
    python = sys.executable
    base_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    published = 0  # events in requests wrk saw answered 2xx, warm-ups included

    load_at_start = os.getloadavg()[0]
    broker_pid = 0

    def load(url: str, pid: int, bodies: Path, connections: int, per_request: int, seconds: float) -> dict:
        nonlocal published
        r = wrk(url, script, bodies, connections, seconds, pid, broker_pid)
        published += (r["requests"] - r["non_2xx"]) * per_request
        r["events_per_s"] = (r["requests"] - r["non_2xx"]) * per_request / r["seconds"]
        return r

    def gateway_cmd(broker: EmbeddedKafka, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
        env = {
            **base_env,
            "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "SPENDSTREAM_KAFKA__PROFILE": "embedded",
            "SPENDSTREAM_CLICKHOUSE__URL": "http://127.0.0.1:1",
            "SPENDSTREAM_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            "SPENDSTREAM_GATEWAY__PORT": str(port),
            "SPENDSTREAM_GATEWAY__WORKERS": str(workers),
            "SPENDSTREAM_LOG_LEVEL": "WARNING",
        }
        return [python, "-m", "spendstream.cli", "gateway"], env

    batch: list[dict] = []
    single: list[dict] = []
    bare: list[dict] = []
    with EmbeddedKafka(log_path=work / "tansu.log") as broker:
        broker_pid = broker.pid or 0
        port = free_port()
        with server(*gateway_cmd(broker, port, args.batch_workers), port, work / "gateway-batch.log") as (url, pid):
            load(url, pid, batch_bodies, args.connections_batch, args.batch, 2)  # warm-up
            for _ in range(args.rounds):
                batch.append(load(url, pid, batch_bodies, args.connections_batch, args.batch, args.duration))

        # single posts: gateway and bare app up together, measured in alternation so that load
        # from other jobs on the shared machine hits both alike
        port, bare_port = free_port(), free_port()
        (work / "bare_app.py").write_text(BARE_APP)
        bare_cmd = [python, "-m", "uvicorn", "bare_app:app", "--app-dir", str(work), "--port", str(bare_port),
                    "--workers", str(args.single_workers), "--loop", "uvloop", "--http", "httptools",
                    "--no-access-log", "--log-level", "warning"]  # fmt: skip
        with (
            server(*gateway_cmd(broker, port, args.single_workers), port, work / "gateway-single.log") as (url, pid),
            server(bare_cmd, base_env, bare_port, work / "bare.log") as (bare_url, bare_pid),
        ):
            load(url, pid, single_bodies, args.connections_single, 1, 2)
            load(bare_url, bare_pid, single_bodies, args.connections_single, 0, 2)
            for pair in range(args.single_rounds):
                runs = [
                    lambda: single.append(load(url, pid, single_bodies, args.connections_single, 1, args.duration)),
                    lambda: bare.append(
                        load(bare_url, bare_pid, single_bodies, args.connections_single, 0, args.duration)
                    ),
                ]
                for run in runs if pair % 2 == 0 else runs[::-1]:
                    run()
        records, events = asyncio.run(count_on_topic(broker.bootstrap))

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    def cpu(rows: list[dict], per: int) -> str:
        return (
            f"gateway {med(rows, 'cpu_us_per_request') / per:.2f}, load generator (wrk) "
            f"{med(rows, 'client_cpu_us_per_request') / per:.2f}, broker {med(rows, 'broker_cpu_us_per_request') / per:.2f}"
        )

    ratios = [s["rps"] / b["rps"] for s, b in zip(single, bare)]
    cpu_ratios = [b["cpu_us_per_request"] / s["cpu_us_per_request"] for s, b in zip(single, bare)]
    print(
        f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} (2 cores, shared "
        f"with other jobs); rounds of {args.duration:.0f} s"
    )
    print(
        f"batch of {args.batch}, {args.batch_workers} gateway workers, {args.connections_batch} connections, "
        f"{args.rounds} rounds: {med(batch, 'events_per_s'):,.0f} events/s "
        f"(rounds: {', '.join(format(r['events_per_s'], ',.0f') for r in batch)}), "
        f"p50 {med(batch, 'p50_ms'):.1f} ms, p99 {med(batch, 'p99_ms'):.1f} ms, non-2xx {sum(r['non_2xx'] for r in batch)}"
    )
    print(
        f"  CPU us/event: {cpu(batch, args.batch)} "
        f"(gateway alone: {args.batch * 1e6 / med(batch, 'cpu_us_per_request'):,.0f} events/s per busy core)"
    )
    print(
        f"single events, {args.single_workers} worker(s) each, {args.connections_single} connections, "
        f"{args.single_rounds} alternating pairs: gateway {med(single, 'rps'):,.0f} req/s "
        f"(p50 {med(single, 'p50_ms'):.2f} ms, p99 {med(single, 'p99_ms'):.2f} ms, "
        f"non-2xx {sum(r['non_2xx'] for r in single)}) | bare FastAPI {med(bare, 'rps'):,.0f} req/s "
        f"(p50 {med(bare, 'p50_ms'):.2f} ms, p99 {med(bare, 'p99_ms'):.2f} ms)"
    )
    print(
        f"  gateway/bare req/s per pair: {', '.join(f'{x:.2f}' for x in ratios)}; "
        f"MEDIAN {statistics.median(ratios):.2f} (target >= 0.80)"
    )
    print(
        f"  CPU us/request: {cpu(single, 1)}; bare FastAPI {med(bare, 'cpu_us_per_request'):.1f} "
        f"(bare/gateway per pair: {', '.join(f'{x:.2f}' for x in cpu_ratios)}; median {statistics.median(cpu_ratios):.2f})"
    )
    print(
        f"usage.raw: {records} records holding {events} events; wrk saw {published} events answered 202 "
        f"(the topic may also hold requests still in flight when a wrk run ended)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
