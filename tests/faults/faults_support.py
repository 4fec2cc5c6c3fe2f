"""What the fault tests share: the stack, the truth of a run, and the checks against it.

The truth is what the gateway acknowledged: ``spendstream simulate``'s record (every event of a
202, with its tenant). Expected costs come from the pure cores only — the gateway's normalisation
(``ingest_gateway.logic.validate_event``) and the pricing core (``spendstream.pricing.price``) —
never from what the stages wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from spendstream.clickhouse import get_client
from spendstream.contracts import nanos_to_usd_str, usd_to_nanos
from spendstream.devstack import Stack
from spendstream.ports import free_port
from spendstream.topics import USAGE_PRICED, USAGE_RAW
from stream_processors.stages import STAGES

log = logging.getLogger("spendstream.faults")

#: events per fault run: CI size by default; `make faults` runs 1M
EVENTS = int(os.environ.get("SPENDSTREAM_FAULTS_EVENTS", "40000"))
FULL_SIZE = EVENTS >= 1_000_000
#: SIGKILLs per run: 20 at full size, fewer at CI size
KILLS = int(os.environ.get("SPENDSTREAM_FAULTS_KILLS", "20" if FULL_SIZE else "6"))
#: comma-separated components to kill (e.g. "pricing" to replay a stage-restart loss); empty: all
TARGETS = {name for name in os.environ.get("SPENDSTREAM_FAULTS_TARGETS", "").split(",") if name}
#: seed of the kill schedule and the fleet; a failure prints it, set it to replay that run
SEED = int(os.environ.get("SPENDSTREAM_FAULTS_SEED", str(random.SystemRandom().randrange(2**31))))


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- truth ------------------------------------------------------------------------------------------
@dataclass
class Truth:
    """The acknowledged events of a run, priced by the pure cores."""

    tenants: list[str]
    #: event_id -> (tenant, expected cost_nanos, normalised event)
    events: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    duplicates_in_record: int = 0

    @classmethod
    def load(cls, record: Path, tenants: list[str]) -> Truth:
        from ingest_gateway.logic import validate_event
        from spendstream.pricing import default_catalog, price

        catalog = default_catalog()
        truth = cls(tenants)
        for line in record.read_bytes().splitlines():
            raw = orjson.loads(line)
            tenant = tenants[raw.pop("tenant_key")]
            event, errors = validate_event(raw)
            assert event is not None, f"an acknowledged event does not validate: {errors}"
            if event["event_id"] in truth.events:
                truth.duplicates_in_record += 1
                continue
            truth.events[event["event_id"]] = (tenant, price(event, catalog).cost_nanos, event)
        return truth

    def totals(self) -> dict[str, tuple[int, int]]:
        """tenant -> (events, cost_nanos)"""
        out: dict[str, list[int]] = {t: [0, 0] for t in self.tenants}
        for tenant, cost, _ in self.events.values():
            out[tenant][0] += 1
            out[tenant][1] += cost
        return {t: (n, c) for t, (n, c) in out.items()}


def estimate_cost_per_event(fleet_kwargs: dict[str, Any], sample: int = 2_000) -> int:
    """Mean nano-USD of a fleet's events (to size budgets so that thresholds are crossed mid-run)."""
    from ingest_gateway.logic import validate_event
    from spendstream.pricing import default_catalog, price
    from spendstream.simulate import Fleet

    catalog = default_catalog()
    fleet = Fleet(**{**fleet_kwargs, "seed": fleet_kwargs.get("seed", 0) + 1})
    total = 0
    for _ in range(sample):
        event, _ = validate_event(fleet.event())
        total += price(event, catalog).cost_nanos
    return total // sample


# -- ClickHouse against the truth -------------------------------------------------------------------
def stored_count(stack: Stack) -> int:
    client = get_client(stack.settings)
    try:
        return int(client.command("SELECT count() FROM usage_events"))
    finally:
        client.close()


def wait_stored(stack: Stack, expected: int, timeout: float) -> None:
    """Until usage_events holds ``expected`` rows, then that it stays there for 3 s (a late
    duplicate from a replay would show up as a higher count)."""
    wait_until(
        f"{expected} rows in usage_events (have {stored_count(stack)})",
        lambda: stored_count(stack) >= expected,
        timeout,
        interval=0.5,
    )
    settle_until = time.monotonic() + 3
    while time.monotonic() < settle_until:
        assert stored_count(stack) == expected, "more rows than acknowledged events: something was counted twice"
        time.sleep(0.5)


def check_clickhouse_against(stack: Stack, truth: Truth) -> dict[str, Any]:
    """0 lost, 0 double-counted, every cost as the pricing core computes it, every aggregate equal
    to usage_events. Returns the figures for the log."""
    client = get_client(stack.settings)
    try:
        stored: dict[str, tuple[str, int]] = {}
        duplicated = 0
        for event_id, tenant, cost in client.query("SELECT event_id, tenant, cost_nanos FROM usage_events").result_rows:
            if event_id in stored:
                duplicated += 1
            stored[event_id] = (tenant, cost)
        missing = truth.events.keys() - stored.keys()
        unexpected = stored.keys() - truth.events.keys()
        wrong_cost = [
            (e, stored[e][1], truth.events[e][1])
            for e in truth.events.keys() & stored.keys()
            if stored[e] != truth.events[e][:2]
        ]
        assert not missing, f"{len(missing)} acknowledged events are not in usage_events, e.g. {sorted(missing)[:5]}"
        assert not duplicated, f"{duplicated} events stored more than once"
        assert not unexpected, f"{len(unexpected)} stored events were never acknowledged, e.g. {sorted(unexpected)[:5]}"
        assert not wrong_cost, f"{len(wrong_cost)} events with another tenant or cost than priced: {wrong_cost[:5]}"

        expected = truth.totals()
        raw = {
            t: (n, c)
            for t, n, c in client.query(
                "SELECT tenant, count(), sum(cost_nanos) FROM usage_events GROUP BY tenant"
            ).result_rows
        }
        assert raw == {t: v for t, v in expected.items() if v[0]}, (raw, expected)
        for table, grouped_by_tag in aggregate_tables(client):
            key = "tenant, tag_key" if grouped_by_tag else "tenant"
            rows = client.query(f"SELECT {key}, sum(calls), sum(cost_nanos) FROM {table} GROUP BY {key}").result_rows
            for row in rows:
                tenant, calls, cost = row[0], row[-2], row[-1]
                assert (calls, cost) == raw[tenant], (
                    f"{table} {row[:-2]}: ({calls}, {cost}) != usage_events {raw[tenant]}"
                )
            assert {r[0] for r in rows} == set(raw), f"{table} lacks tenants: {set(raw) - {r[0] for r in rows}}"
        return {"events": len(stored), "per_tenant": raw}
    finally:
        client.close()


def aggregate_tables(client: Any) -> list[tuple[str, bool]]:
    """Every MV target with calls and cost_nanos measures; (name, has a tag_key column)."""
    rows = client.query(
        "SELECT table, groupArray(name) FROM system.columns WHERE database = currentDatabase()"
        " AND table != 'usage_events' GROUP BY table"
    ).result_rows
    tables = [(t, "tag_key" in cols) for t, cols in rows if {"calls", "cost_nanos"} <= set(cols)]
    assert tables, "no aggregate tables found"
    return sorted(tables)


# -- alerts -----------------------------------------------------------------------------------------
class Receiver:
    """A local webhook receiver: records every delivery (Idempotency-Key, JSON body), answers 200."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()
        deliveries = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    deliveries.append((self.headers.get("Idempotency-Key", ""), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._server.shutdown()


@dataclass
class BudgetPlan:
    tenant: str
    scope: dict[str, str]
    window: str
    limit_nanos: int
    thresholds: tuple[int, ...] = (50, 80, 100)
    id: str = ""


def alerts_in_place(stack: Stack) -> bool:
    return {"budgets", "notify", "query-api"} <= set(stack.names)


def create_alerting(stack: Stack, keys: dict[str, str], receiver: Receiver, plans: list[BudgetPlan]) -> None:
    """One generic webhook per tenant, the budgets of ``plans`` (ids filled in), then wait until
    the budgets stage has loaded them (it counts spend from then on)."""
    webhooks: dict[str, str] = {}
    with httpx.Client(base_url=stack.query_url, timeout=30) as api:
        for tenant in {p.tenant for p in plans}:
            resp = api.post(
                "/v1/webhooks",
                json={"url": receiver.url, "format": "generic"},
                headers={"Authorization": f"Bearer {keys[tenant]}"},
            )
            assert resp.status_code == 201, resp.text
            webhooks[tenant] = resp.json()["id"]
        for plan in plans:
            resp = api.post(
                "/v1/budgets",
                headers={"Authorization": f"Bearer {keys[plan.tenant]}"},
                json={
                    "name": f"{plan.window} {plan.scope or 'tenant'}",
                    "scope": plan.scope,
                    "window": plan.window,
                    "limit_usd": nanos_to_usd_str(plan.limit_nanos),
                    "thresholds": list(plan.thresholds),
                    "forecast": False,
                    "channels": [webhooks[plan.tenant]],
                },
            )
            assert resp.status_code == 201, resp.text
            body = resp.json()
            plan.id = body["id"]
            plan.limit_nanos = usd_to_nanos(body["limit_usd"])
    port = stack.settings.processors.web_port + STAGES.index("budgets")

    def loaded() -> bool:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("spendstream_budgets_loaded"):
                return float(line.split()[-1]) >= len(plans)
        return False

    wait_until("the budgets stage to load the budgets", loaded, 60)


def expected_crossings(truth: Truth, plans: list[BudgetPlan]) -> set[tuple[str, str, int]]:
    """(budget id, window, threshold) every threshold the acknowledged spend reached; window is
    the UTC day for daily budgets and "total" otherwise."""
    spent: dict[tuple[str, str], int] = defaultdict(int)
    for tenant, cost, event in truth.events.values():
        for plan in plans:
            if plan.tenant == tenant and all(event.get(k) == v for k, v in plan.scope.items()):
                window = event["timestamp"][:10] if plan.window == "daily" else "total"
                spent[(plan.id, window)] += cost
    by_id = {p.id: p for p in plans}
    return {
        (budget_id, window, t)
        for (budget_id, window), amount in spent.items()
        for t in by_id[budget_id].thresholds
        if amount * 100 >= t * by_id[budget_id].limit_nanos
    }


def received_crossings(receiver: Receiver, plans: list[BudgetPlan]) -> dict[tuple[str, str, int], set[str]]:
    """(budget id, window, threshold) -> the alert_ids delivered for it."""
    daily = {p.id for p in plans if p.window == "daily"}
    out: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for key, body in list(receiver.deliveries):
        if body.get("kind") != "threshold":
            continue
        assert key == body["alert_id"], f"Idempotency-Key {key!r} is not the alert_id {body['alert_id']!r}"
        window = (
            datetime.fromisoformat(body["window_start"].replace("Z", "+00:00")).date().isoformat()
            if body["budget_id"] in daily
            else "total"
        )
        out[(body["budget_id"], window, int(Decimal(body["threshold"])))].add(body["alert_id"])
    return out


def check_alerts(receiver: Receiver, truth: Truth, plans: list[BudgetPlan], timeout: float = 120) -> dict[str, Any]:
    expected = expected_crossings(truth, plans)
    assert expected, "the budgets were sized so that thresholds are crossed; none was: check the sizing"
    try:
        wait_until(
            f"{len(expected)} crossings at the webhook receiver",
            lambda: expected <= received_crossings(receiver, plans).keys(),
            timeout,
        )
    except AssertionError as exc:
        got = received_crossings(receiver, plans).keys()
        raise AssertionError(f"{exc}: missing {sorted(expected - got)}, received {sorted(got)}") from None
    received = received_crossings(receiver, plans)
    assert received.keys() == expected, f"unexpected crossings: {received.keys() - expected}"
    several = {k: v for k, v in received.items() if len(v) != 1}
    assert not several, f"crossings with more than one alert_id: {several}"
    deliveries = sum(1 for _, body in receiver.deliveries if body.get("kind") == "threshold")
    return {"crossings": len(expected), "deliveries": deliveries}


# -- the kill schedule ------------------------------------------------------------------------------
def kill_schedule(rng: random.Random, targets: list[str], kills: int, seconds: float) -> list[tuple[float, str]]:
    """(seconds after the start, component): one kill in each of ``kills`` equal slices of the run;
    every target at least once when there are enough kills, the rest drawn at random."""
    victims = rng.sample(targets, min(kills, len(targets)))
    victims += [rng.choice(targets) for _ in range(kills - len(victims))]
    rng.shuffle(victims)
    slice_s = seconds / kills
    return [(slice_s * (i + rng.uniform(0.2, 0.8)), victim) for i, victim in enumerate(victims)]


def run_kills(stack: Stack, schedule: list[tuple[float, str]], started: float, done: list[tuple[float, str]]) -> None:
    """Kill on schedule, one at a time: each waits until the previous victim is healthy again."""
    for at, name in schedule:
        delay = started + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule itself, not a readiness wait
        stack.wait_healthy(timeout=180)
        log.warning("fault: SIGKILL %s at %.1fs", name, time.monotonic() - started)
        stack.kill(name)
        done.append((time.monotonic() - started, name))
        stack.wait_healthy((name,), timeout=180)
    stack.wait_healthy(timeout=180)


# -- diagnosis of a failed run ----------------------------------------------------------------------
def locate_missing(stack: Stack, truth: Truth, limit: int = 10) -> str:
    """Where acknowledged events missing from usage_events went: the usage.raw record holding each
    (partition, offset), and whether usage.priced holds a record for that position and with it."""
    client = get_client(stack.settings)
    try:
        stored = {row[0] for row in client.query("SELECT DISTINCT event_id FROM usage_events").result_rows}
    finally:
        client.close()
    missing = truth.events.keys() - stored
    if not missing:
        return "no acknowledged event is missing"
    raw = asyncio.run(_read_topic(stack.settings, USAGE_RAW.name))
    priced = asyncio.run(_read_topic(stack.settings, USAGE_PRICED.name))
    where: dict[tuple[int, int], list[str]] = defaultdict(list)
    for p, o, value in raw:
        try:
            events = orjson.loads(value).get("events", [])
        except (orjson.JSONDecodeError, AttributeError):
            continue
        for event in events:
            if isinstance(event, dict) and event.get("event_id") in missing:
                where[(p, o)].append(event["event_id"])
    priced_src: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for p, o, value in priced:
        env = orjson.loads(value)
        src = env.get("src") or {}
        priced_src[(src.get("partition"), src.get("offset"))].append((p, o, len(env.get("events", []))))
    lines = [
        f"{len(missing)} missing events in {len(where)} usage.raw records"
        f" ({len(missing) - sum(map(len, where.values()))} not found in usage.raw at all):"
    ]
    for (p, o), ids in sorted(where.items())[:limit]:
        found = priced_src.get((p, o), [])
        lines.append(
            f"  raw {p}@{o}: {len(ids)} missing; priced records for it (partition, offset, events): "
            f"{found or 'none'}; neighbours {priced_src.get((p, o - 1))} / {priced_src.get((p, o + 1))}"
        )
    return "\n".join(lines)


async def _read_topic(settings: Any, topic: str) -> list[tuple[int, int, bytes]]:
    """Every record of ``topic`` now: (partition, offset, value)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from spendstream.kafka import consumer_kwargs

    consumer = AIOKafkaConsumer(**consumer_kwargs(settings, None))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, int, bytes]] = []
        done = {tp for tp in tps if end[tp] == 0}
        deadline = time.monotonic() + 60
        while len(done) < len(tps) and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                out.extend((tp.partition, r.offset, r.value) for r in records if r.offset < end[tp])
                if records and records[-1].offset >= end[tp] - 1:
                    done.add(tp)
        return out
    finally:
        await consumer.stop()
