"""Baselines measured in the same run as the system figures, on the same broker and ClickHouse:
what the bare parts do without Spendstream, so every system timing can be given as a ratio.

- bare FastAPI: a uvicorn app (same flags as the gateway) whose POST reads the body and answers a
  constant 202, loaded with the same bodies and client as the gateway; GET latency of a constant;
- raw aiokafka: the gateway's records (one envelope per project of a request, snappy, acks=all)
  produced as fast as the producer goes, consumed back; produce → consume latency of one record;
- raw INSERT: the sink's columns inserted with clickhouse-connect into a plain copy of
  usage_events (no views) and into the product schema (five materialized views); one-row insert
  latency; ``SELECT 1`` latency.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from bench.load import Bodies, closed_loop
from spendstream.clickhouse import get_client
from spendstream.contracts import raw_envelope, record_key
from spendstream.ports import free_port
from spendstream.settings import Settings

BARE_APP = """
import os
from fastapi import FastAPI, Request, Response
app = FastAPI()
ANSWER = b'{"accepted":%d}' % int(os.environ["BENCH_BATCH"])
@app.post("/v1/events", status_code=202)
async def events(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, status_code=202, media_type="application/json")
@app.get("/v1/check")
async def check() -> Response:
    return Response(b'{"allowed":true}', media_type="application/json")
"""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Latency:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        return cls(*(percentile(seconds, q) * 1000 for q in (50, 95, 99)), len(seconds))

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms, p99 {self.p99_ms:.1f} ms (n={self.n})"


@contextmanager
def bare_fastapi(work: Path, batch: int) -> Iterator[str]:
    app_dir = work / "bare"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--app-dir",
        str(app_dir),
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with open(work / "bare.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "BENCH_BATCH": str(batch)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/check", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bare FastAPI did not start; see {work / 'bare.log'}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def sequential_latency(url: str, n: int, body: bytes | None = None) -> Latency:
    """One request at a time: POST ``body`` or GET; the time to the answer."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(n):
            started = time.monotonic()
            resp = await (
                client.post(url, content=body, headers={"Content-Type": "application/json"})
                if body is not None
                else client.get(url)
            )
            samples.append(time.monotonic() - started)
            assert resp.status_code < 300, resp.text
    return Latency.of(samples)


def gateway_records(body: bytes) -> list[tuple[bytes, bytes, int]]:
    """What the gateway produces for one request: (key, envelope, events) per project."""
    by_project: dict[str, list] = {}
    for event in orjson.loads(body):
        by_project.setdefault(event["project"], []).append(event)
    received = "2026-01-01T00:00:00.000Z"
    return [
        (record_key("bench", p), orjson.dumps(raw_envelope("bench", p, received, evs)), len(evs))
        for p, evs in by_project.items()
    ]


async def raw_kafka(settings: Settings, bodies: Bodies, seconds: float) -> dict[str, float]:
    """events/s produced (acks=all, gateway's compression) and consumed; one-record hop latency."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from ingest_gateway.publisher import COMPRESSION
    from spendstream.kafka import client_kwargs, consumer_kwargs, producer_kwargs

    topic, hop_topic = f"bench.raw.{uuid.uuid4().hex[:8]}", f"bench.hop.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    await admin.create_topics([NewTopic(t, settings.kafka.partitions, 1) for t in (topic, hop_topic)])
    await admin.close()
    records = [gateway_records(bodies.next()) for _ in range(40)]
    producer = AIOKafkaProducer(**producer_kwargs(settings, compression_type=COMPRESSION, linger_ms=0))
    await producer.start()
    produced = 0
    started = time.monotonic()
    try:
        pending: list[asyncio.Future] = []
        i = 0
        while time.monotonic() - started < seconds:
            for key, value, n in records[i % len(records)]:
                pending.append(await producer.send(topic, value, key=key))
                produced += n
            i += 1
            if len(pending) > 2_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        produce_s = time.monotonic() - started

        consumer = AIOKafkaConsumer(topic, **consumer_kwargs(settings, None))
        await consumer.start()
        consumed = 0
        started = time.monotonic()
        while consumed < produced:
            for msgs in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                consumed += sum(len(orjson.loads(m.value)["events"]) for m in msgs)
        consume_s = time.monotonic() - started
        await consumer.stop()

        hop = AIOKafkaConsumer(hop_topic, **consumer_kwargs(settings, None, fetch_max_wait_ms=5))
        await hop.start()
        await hop.getmany(timeout_ms=200)  # assignment done before the clock runs
        samples = []
        for n in range(200):
            sent = time.monotonic()
            await producer.send_and_wait(hop_topic, str(n).encode(), key=b"k")
            got = False
            while not got:
                got = any(msgs for msgs in (await hop.getmany(timeout_ms=100)).values())
            samples.append(time.monotonic() - sent)
        await hop.stop()
    finally:
        await producer.stop()
    return {
        "produce_events_s": produced / produce_s,
        "consume_events_s": consumed / consume_s,
        "hop": Latency.of(samples),
    }


def raw_insert(settings: Settings, bodies: Bodies, rows: int = 200_000, per_insert: int = 10_000) -> dict[str, float]:
    """rows/s of clickhouse-connect inserts, product schema; latencies. Two forms of the same rows:
    the sink's own insert (a JSONEachRow body of priced records into ``usage_events_in``, which
    ClickHouse unpacks into usage_events and its views), and the rows as Native columns into a
    plain copy of usage_events (no views: the floor)."""
    from spendstream.contracts import priced_envelope
    from spendstream.migrate import main as migrate
    from stream_processors.sink.logic import PricedRecord
    from stream_processors.sink.writer import insert_records

    scratch = f"bench_baseline_{uuid.uuid4().hex[:8]}"
    scratch_settings = settings.model_copy(
        update={"clickhouse": settings.clickhouse.model_copy(update={"database": scratch})}
    )
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):  # the migrator prints a line per file
        assert migrate(scratch_settings) == 0
    client = get_client(scratch_settings)
    events: list[dict] = []
    while len(events) < per_insert:
        for event in orjson.loads(bodies.next()):
            event.update(
                cost_nanos=123_456,
                cost={"input": 100_000, "output": 23_456},
                price_id="bench",
                pricing_status="priced",
                price_source="catalog",
            )
            events.append(event)
    raw = {"tenant": "bench", "project": "p", "received_at": events[0]["timestamp"]}
    per_record = 50
    values = [orjson.dumps(priced_envelope(raw, 0, i, events[i:i + per_record]))
              for i in range(0, per_insert, per_record)]  # fmt: skip
    inserted = 0

    def sink_insert(values: list[bytes]) -> None:
        # fresh Kafka offsets per insert, as the sink's would be: identical blocks would be deduplicated
        nonlocal inserted
        records = [PricedRecord(0, inserted + n, 0, 0, inserted + n, 0, value) for n, value in enumerate(values)]
        inserted += len(values)
        insert_records(client, records, f"bench-{inserted}")

    try:
        client.command("CREATE TABLE plain AS usage_events")
        sink_insert(values)
        stored = client.query(f"SELECT * FROM usage_events LIMIT {per_insert}")
        columns, names = list(stored.result_columns), list(stored.column_names)
        out: dict[str, float] = {}
        started = time.monotonic()
        for _ in range(rows // per_insert):
            client.insert("plain", columns, column_names=names, column_oriented=True)
        out["insert_plain_rows_s"] = rows / (time.monotonic() - started)
        started = time.monotonic()
        for _ in range(rows // per_insert):
            sink_insert(values)
        out["insert_with_views_rows_s"] = rows / (time.monotonic() - started)
        one_value = [orjson.dumps(priced_envelope(raw, 0, 0, events[:1]))]
        one_row = [col[:1] for col in columns]
        for label, insert_one in (
            ("insert_one_plain", lambda: client.insert("plain", one_row, column_names=names, column_oriented=True)),
            ("insert_one", lambda: sink_insert(one_value)),
        ):
            samples = []
            for _ in range(100):
                started = time.monotonic()
                insert_one()
                samples.append(time.monotonic() - started)
            out[label] = Latency.of(samples)
        samples = []
        for _ in range(200):
            started = time.monotonic()
            client.command("SELECT 1")
            samples.append(time.monotonic() - started)
        out["select_1"] = Latency.of(samples)
        client.command(f"DROP DATABASE {scratch}")
        return out
    finally:
        client.close()


async def bare_http(work: Path, bodies: Bodies, seconds: float, connections: int) -> dict[str, float]:
    with bare_fastapi(work, bodies.batch) as url:
        await closed_loop(url + "/v1/events", "k", bodies, seconds=2, connections=connections)  # warm-up
        load = await closed_loop(url + "/v1/events", "k", bodies, seconds=seconds, connections=connections)
        single = orjson.dumps(orjson.loads(bodies.next())[0])
        return {
            "events_s": load.accepted / seconds,
            "requests_s": load.requests / seconds,
            "batch_latency": Latency.of(load.latencies_s),
            "post_one": await sequential_latency(url + "/v1/events", 300, single),
            "get": await sequential_latency(url + "/v1/check", 300),
        }
