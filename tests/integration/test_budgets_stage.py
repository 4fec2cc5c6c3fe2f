"""The budgets stage as `spendstream processors --stages budgets` on a real broker and ClickHouse,
fed priced envelopes on spendstream.usage.priced (the pricing stage's output format).

- thresholds 50/80/100 fire exactly once each per window, with the figures of the crossing event,
  for a project budget (one partition) and a tenant-wide one (every partition); the alerts are
  recorded in ClickHouse; budget.state holds the priced input's spend;
- a budget created while the stage runs applies within seconds, without restart;
- SIGKILL mid-stream, input arriving all along: after the restart the set of alert ids equals
  the crossings computed from the input (none missing, none extra, a repeated id carries the
  same figures) and the spend state equals the priced input.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from stage_support import StageWorker, produce, read_topic, stage_settings  # noqa: F401 - fixture

from spendstream.budgets import Budget, calendar_window, canonical_threshold
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.contracts import budget_alert_id, record_key, usd_to_nanos
from spendstream.topics import BUDGET_ALERTS, BUDGET_STATE, USAGE_PRICED

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "acme"
UTC = UTC
#: noon yesterday (UTC): inside the allowed lateness, far from any window edge
EVENT_TIME = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)


class PricedFeed:
    """usage.priced records as the pricing stage writes them: partition = raw partition, src
    offsets ascending per partition."""

    def __init__(self, partitions: int):
        self.partitions = partitions
        self.offsets: dict[int, int] = defaultdict(int)
        self.events: list[dict] = []

    def record(self, project: str, costs: list[int], agent: str = "agent-1", tags: dict | None = None):
        partition = sum(project.encode()) % self.partitions
        offset = self.offsets[partition]
        self.offsets[partition] += 1
        events = []
        for cost in costs:
            n = len(self.events)
            ts = EVENT_TIME + timedelta(milliseconds=n)
            ev = {"event_id": f"ev-{n}", "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
                  "project": project, "agent": agent, "provider": "openai", "model": "gpt-4o", "tags": tags or {},
                  "cost_nanos": cost, "pricing_status": "priced"}  # fmt: skip
            events.append(ev)
            self.events.append(ev)
        env = {"v": 1, "tenant": TENANT, "project": project, "received_at": "2025-01-01T00:00:00.000Z",
               "src": {"partition": partition, "offset": offset}, "events": events}  # fmt: skip
        return record_key(TENANT, project), orjson.dumps(env), partition


def add_budget(settings, budget: Budget) -> None:
    client = get_client(settings)
    try:
        insert_budget(client, budget, version=time.time_ns() // 1000)
    finally:
        client.close()


def latest_by_key(records) -> dict[bytes, dict]:
    return {r.key: orjson.loads(r.value) for r in records}


def expected_ids(budget: Budget, spent: int, ts_ms: int) -> set[str]:
    start, _ = calendar_window(budget.window, budget.timezone, ts_ms)
    return {
        budget_alert_id(budget.id, start, f"{canonical_threshold(t)}@{budget.limit_nanos}")
        for t in budget.thresholds if spent * 100 >= t * budget.limit_nanos
    }  # fmt: skip


async def test_thresholds_fire_once_each_with_figures(stage_settings, tmp_path):
    s = stage_settings
    project_budget = Budget(TENANT, "b-proj", "p1 daily", {"project": "p1"}, "daily", "UTC", usd_to_nanos("10"),
                            forecast=False, channels=("oncall@example.com",))  # fmt: skip
    tenant_budget = Budget(TENANT, "b-all", "all projects", {}, "total", "UTC", usd_to_nanos("20"), forecast=False)
    other_tenant = Budget("someone-else", "b-other", "x", {}, "total", "UTC", 1, forecast=False)
    for b in (project_budget, tenant_budget, other_tenant):
        add_budget(s, b)
    feed = PricedFeed(s.kafka.partitions)
    dollar = usd_to_nanos("1")
    # p1: $4.50, then $0.50 crosses 50 % ($5), ..., $2 crosses 80 % and 100 % is crossed at $10.00
    records = [feed.record("p1", [4 * dollar + dollar // 2]), feed.record("p1", [dollar // 2]),
               feed.record("p1", [dollar, 2 * dollar]), feed.record("p1", [dollar, dollar])]  # fmt: skip
    records += [feed.record(f"p{i}", [dollar] * 3, agent=f"agent-{i}") for i in range(2, 6)]  # $12 elsewhere
    await produce(s, USAGE_PRICED.name, records)
    total = sum(e["cost_nanos"] for e in feed.events)

    worker = StageWorker(s, "budgets", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 6, what="six alerts")
        state = await read_topic(
            s, BUDGET_STATE.name, lambda rs: latest_by_key(rs).get(b"b-all|0", {}).get("spent_nanos") == total,
            what="tenant-wide spend",
        )  # fmt: skip
        # nothing more comes: read again after the stage went idle
        await asyncio.sleep(1.0)
        alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 6)
        metrics = worker.metrics()
    finally:
        worker.stop()

    values = [orjson.loads(r.value) for r in alerts]
    assert len(values) == 6 and len({v["alert_id"] for v in values}) == 6
    assert all(r.key.decode() == orjson.loads(r.value)["alert_id"] for r in alerts)
    proj = sorted((v for v in values if v["budget_id"] == "b-proj"), key=lambda v: Decimal(v["threshold"]))
    assert [(v["threshold"], v["spent_usd"], v["event_id"]) for v in proj] == [
        ("50", "5.000000000", "ev-1"),
        ("80", "8.000000000", "ev-3"),
        ("100", "10.000000000", "ev-5"),
    ]
    day_start = EVENT_TIME.replace(hour=0)
    assert {v["window_start"] for v in proj} == {day_start.strftime("%Y-%m-%dT%H:%M:%S.000Z")}
    assert proj[0]["channels"] == ["oncall@example.com"] and proj[0]["scope"] == {"project": "p1"}
    assert proj[2]["top"][0] == {"kind": "agent", "name": "agent-1", "spent_usd": "10.000000000"}
    assert {v["alert_id"] for v in proj} == expected_ids(
        project_budget, 10 * dollar, int(EVENT_TIME.timestamp() * 1000)
    )
    # tenant-wide: events of several partitions, in whatever order they met; each alert is named by
    # the event that crossed: spend before it was under the threshold, with it at or over
    whole = [v for v in values if v["budget_id"] == "b-all"]
    assert sorted(Decimal(v["threshold"]) for v in whole) == [50, 80, 100]
    cost_of = {e["event_id"]: e["cost_nanos"] for e in feed.events}
    for v in whole:
        limit_share = Decimal(v["threshold"]) * tenant_budget.limit_nanos / 100
        assert v["spent_nanos"] - cost_of[v["event_id"]] < limit_share <= v["spent_nanos"]
        assert v["window_end"] is None
    latest = latest_by_key(state)
    assert latest[b"b-all|0"]["spent_nanos"] == total == 22 * dollar
    day_key = f"b-proj|{int(day_start.timestamp() * 1000)}".encode()
    assert latest[day_key]["spent_nanos"] == 10 * dollar and latest[day_key]["limit_nanos"] == 10 * dollar
    assert not any(k.startswith(b"b-other") for k in latest)

    client = get_client(s)
    try:
        stored = client.query("SELECT alert_id, spent_nanos FROM budget_alerts FINAL ORDER BY alert_id").result_rows
    finally:
        client.close()
    assert sorted(stored) == sorted((v["alert_id"], v["spent_nanos"]) for v in values)
    assert metrics['spendstream_budgets_alerts_total{kind="threshold"}'] == 6


async def test_budget_created_while_running_applies_without_restart(stage_settings, tmp_path):
    s = stage_settings
    feed = PricedFeed(s.kafka.partitions)
    worker = StageWorker(s, "budgets", tmp_path)
    try:
        add_budget(s, Budget(TENANT, "b-first", "first", {}, "total", "UTC", usd_to_nanos("100"), forecast=False))
        await asyncio.to_thread(worker.wait_healthy)
        await produce(s, USAGE_PRICED.name, [feed.record("p1", [usd_to_nanos("1")])])
        await read_topic(s, BUDGET_STATE.name, lambda rs: b"b-first|0" in latest_by_key(rs), what="first budget")
        # a new budget written to ClickHouse reaches the running stage within a reload period
        add_budget(s, Budget(TENANT, "b-new", "new", {"agent": "late-agent"}, "total", "UTC", usd_to_nanos("1"),
                             thresholds=(Decimal(100),), forecast=False))  # fmt: skip
        deadline = time.monotonic() + 15
        sent = 0
        while True:
            await produce(s, USAGE_PRICED.name, [feed.record("p2", [usd_to_nanos("1")], agent="late-agent")])
            sent += 1
            try:
                alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 1, timeout=1.0)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the new budget never applied"
    finally:
        worker.stop()
    [alert] = [orjson.loads(r.value) for r in alerts]
    assert alert["budget_id"] == "b-new" and alert["threshold"] == "100" and alert["spent_usd"] == "1.000000000"
    assert sent <= 4  # reload period 1 s; each round waits about 1 s


async def test_sigkill_mid_stream_misses_no_crossing_and_counts_spend_once(stage_settings, tmp_path):
    s = stage_settings
    rng = random.Random(3)
    feed = PricedFeed(s.kafka.partitions)
    records = []
    for i in range(1200):
        project = f"p{i % 6}"
        records.append(feed.record(project, [rng.randrange(1, 20_000_000) for _ in range(rng.randrange(1, 6))],
                                   agent=f"agent-{i % 4}", tags={"team": "search" if i % 3 else "ads"}))  # fmt: skip
    total = sum(e["cost_nanos"] for e in feed.events)
    p0 = sum(e["cost_nanos"] for e in feed.events if e["project"] == "p0")
    search = sum(e["cost_nanos"] for e in feed.events if e["tags"]["team"] == "search")
    # many thresholds, so crossings happen all along the stream
    steps = tuple(Decimal(t) for t in range(5, 101, 5))
    budgets = [
        Budget(TENANT, "k-all", "all", {}, "total", "UTC", total, thresholds=steps, forecast=False),
        Budget(TENANT, "k-p0", "p0", {"project": "p0"}, "daily", "Asia/Tokyo", p0 * 2, thresholds=steps, forecast=False),
        Budget(TENANT, "k-tag", "search", {"tag": "team=search"}, "monthly", "UTC", search, thresholds=steps,
               forecast=False),
    ]  # fmt: skip
    for b in budgets:
        add_budget(s, b)
    ts_ms = int(EVENT_TIME.timestamp() * 1000)
    want = (
        expected_ids(budgets[0], total, ts_ms)
        | expected_ids(budgets[1], p0, ts_ms)
        | expected_ids(budgets[2], search, ts_ms)
    )
    assert len(want) == 20 + 10 + 20

    chunks = [records[i : i + 25] for i in range(300, len(records), 25)]
    half_sent = asyncio.Event()

    async def keep_producing() -> None:
        # input keeps arriving before, during and after the kill, and while the restarted worker
        # recovers its table (the case where Faust skipped offsets, see runtime/consumer.py, 6.)
        for n, chunk in enumerate(chunks):
            await produce(s, USAGE_PRICED.name, chunk)
            if n == len(chunks) // 2:
                half_sent.set()
            await asyncio.sleep(0.1)

    await produce(s, USAGE_PRICED.name, records[:300])
    worker = StageWorker(s, "budgets", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 3, what="first alerts")
        producing = asyncio.create_task(keep_producing())
        await half_sent.wait()
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        worker.kill()
        before = {r.key for r in await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 3)}
        worker.restart()
        await asyncio.to_thread(worker.wait_healthy)
        await producing
        state = await read_topic(
            s, BUDGET_STATE.name,
            lambda rs: latest_by_key(rs).get(b"k-all|0", {}).get("spent_nanos") == total, what="all spend applied",
        )  # fmt: skip
        alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: {r.key.decode() for r in rs} >= want,
                                  what="every crossing")  # fmt: skip
        await asyncio.sleep(1.0)
        alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= len(alerts))
        state = await read_topic(s, BUDGET_STATE.name, lambda rs: len(rs) >= len(state))
        assert worker.alive()
    finally:
        worker.stop()

    assert len(before) < len(want), "the kill came after every alert was out; nothing was tested"
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in alerts:
        by_id[r.key.decode()].append(orjson.loads(r.value))
    assert set(by_id) == want
    for copies in by_id.values():
        assert len({(c["spent_nanos"], c["event_id"]) for c in copies}) == 1, "a repeated alert_id with other figures"
    latest = latest_by_key(state)
    assert latest[b"k-all|0"]["spent_nanos"] == total
    tokyo_day = calendar_window("daily", "Asia/Tokyo", ts_ms)[0]
    assert latest[f"k-p0|{tokyo_day}".encode()]["spent_nanos"] == p0
    month = calendar_window("monthly", "UTC", ts_ms)[0]
    assert latest[f"k-tag|{month}".encode()]["spent_nanos"] == search
