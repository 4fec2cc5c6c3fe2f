"""Budgets follow a re-pricing, with the budgets stage running on a real broker and ClickHouse:
events of a model without a price (stored and streamed at cost 0) count in a budget; an override
then prices them and a re-pricing job corrects them. The budget whose window is open follows the
correction through the stage (its spend is the new total and the thresholds the correction
crosses alert, once); the job resumed from its start (as after a crash) fires nothing new and
counts nothing twice; a budget whose window closed before the job is left alone (no correction
reaches it) and the job's diff says which windows were adjusted and which were not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from stage_support import StageWorker, produce, read_topic, stage_settings  # noqa: F401 - fixture

from spendstream.budgets import Budget, Delta
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.contracts import priced_envelope, raw_envelope, record_key
from spendstream.pricing import OverrideBook, default_catalog, price
from spendstream.repricing import jobs, store
from spendstream.repricing.budgets import CORRECTIONS_PARTITION, DeltaPublisher, delta_partition
from spendstream.repricing.planner import Scope
from spendstream.topics import BUDGET_ALERTS, BUDGET_DELTAS, BUDGET_STATE, USAGE_PRICED
from stream_processors.budgets.logic import stable_partition
from stream_processors.sink.logic import PricedRecord
from stream_processors.sink.writer import insert_records

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "acme"
NOW = datetime.now(UTC).replace(microsecond=0)


def _events(project: str, n: int, at: datetime) -> list[dict]:
    return [
        {
            "event_id": f"{project}-{i}",
            "timestamp": (at + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
            "project": project,
            "agent": "agent-1",
            "provider": "acme",
            "model": "mystery-1",
            "input_tokens": 20_000 + 1_000 * i,
            "output_tokens": 2_000 + 100 * i,
        }
        for i in range(n)
    ]


def _add_override(client) -> None:
    client.insert(
        "price_overrides",
        [[TENANT, "ov1", "acme", "mystery-1", NOW - timedelta(days=30), None, Decimal(3), Decimal(15), "", NOW, 0, 1]],
        column_names=["tenant", "id", "provider", "model", "effective_from", "effective_to", "input_mtok",
                      "output_mtok", "note", "created_at", "deleted", "version"],
    )  # fmt: skip


def test_the_correction_partitions_budgets_as_the_stage_does() -> None:
    assert all(delta_partition(f"b-{i}", n) == stable_partition(f"b-{i}", n) for i in range(50) for n in (1, 3, 16))


async def test_open_windows_follow_the_correction_once_and_closed_ones_are_left_alone(stage_settings, tmp_path):
    s = stage_settings
    catalog = default_catalog()
    client = get_client(s)
    try:
        _add_override(client)
        book = OverrideBook.from_rows(store.override_rows(client, TENANT), catalog).for_tenant(TENANT)
        recent = _events("p1", 12, NOW - timedelta(minutes=10))  # in the open (total) window
        old = _events("p0", 5, NOW - timedelta(days=5))  # in a daily window closed days ago
        new_cost = sum(price(e, catalog, book).cost_nanos for e in recent)
        assert new_cost > 0
        # the correction brings the open budget to 90 %: it crosses 50 and 80, not 100
        open_budget = Budget(TENANT, "b-open", "p1", {"project": "p1"}, "total", "UTC", new_cost * 100 // 90,
                             forecast=False)  # fmt: skip
        closed_budget = Budget(TENANT, "b-closed", "p0", {"project": "p0"}, "daily", "UTC", 1, forecast=False)
        for version, b in enumerate((open_budget, closed_budget), 1):
            insert_budget(client, b, version=version)
        # stored and streamed as the pricing stage did: unknown_model, cost 0
        records = []
        for offset, (project, events) in enumerate((("p1", recent), ("p0", old))):
            priced = [{**e, **price(e, catalog, None).event_fields()} for e in events]
            assert {e["cost_nanos"] for e in priced} == {0}
            env = priced_envelope(raw_envelope(TENANT, project, NOW.isoformat().replace("+00:00", "Z"), events),
                                  0, offset, priced)  # fmt: skip
            value = orjson.dumps(env)
            insert_records(client, [PricedRecord(0, offset, 1_000, 0, offset, len(priced), value)], token=f"p/{offset}")
            records.append((record_key(TENANT, project), value, 0))
        await produce(s, USAGE_PRICED.name, records)

        worker = StageWorker(s, "budgets", tmp_path)
        try:
            await asyncio.to_thread(worker.wait_healthy)
            await read_topic(s, BUDGET_STATE.name, lambda rs: any(r.key == b"b-open|0" for r in rs), what="state")

            scope = Scope(TENANT, NOW - timedelta(days=6), NOW + timedelta(minutes=1))
            job = store.Job(TENANT, jobs.new_job_id(), actor="key-1", reason="late price", scope=scope.describe())
            publish = DeltaPublisher(s)
            try:
                done = await asyncio.to_thread(jobs.run, client, catalog, job, batch_events=5, sample_size=3,
                                               publish=publish)  # fmt: skip
                assert done.status == store.DONE and done.diff["events_changed"] == 17

                def spent(rs) -> int | None:
                    values = [orjson.loads(r.value) for r in rs if r.key == b"b-open|0"]
                    return values[-1]["spent_nanos"] if values else None

                await read_topic(s, BUDGET_STATE.name, lambda rs: spent(rs) == new_cost, what="corrected spend")
                alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 2, what="two alerts")
                # the job resumed from its start, as after a crash before its cursor was saved
                again = replace(store.load_job(client, TENANT, job.id), status=store.RUNNING, cursor=store.START,
                                batches=0)  # fmt: skip
                await asyncio.to_thread(jobs.run, client, catalog, again, batch_events=5, sample_size=3,
                                        publish=publish)  # fmt: skip
            finally:
                await asyncio.to_thread(publish.close)
            time.sleep(2.0)  # the stage's batches are 0.05 s: anything it would apply is applied by now
            state = await read_topic(s, BUDGET_STATE.name, lambda rs: spent(rs) is not None)
            alerts = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 2)
            # 12 events of p1 in batches of 5 after the 5 of p0: 3 records per run, sent by both runs
            deltas = await read_topic(
                s,
                BUDGET_DELTAS.name,
                lambda rs: sum(r.key == b"b-open" and b'"partition":-1' in r.value for r in rs) >= 6,
            )
        finally:
            worker.stop()
    finally:
        client.close()

    assert spent(state) == new_cost, "the open window's spend is the corrected total, counted once"
    values = [orjson.loads(r.value) for r in alerts]
    assert sorted((v["budget_id"], v["threshold"]) for v in values) == [("b-open", "50"), ("b-open", "80")]
    assert len({v["alert_id"] for v in values}) == 2, "no alert fired twice"
    corrections = [d for d in (Delta.decode(r.value) for r in deltas) if d.src_partition == CORRECTIONS_PARTITION]
    assert {d.budget_id for d in corrections} == {"b-open"}, "no correction reached the closed window"
    assert sum(e.cost_nanos for d in corrections for _, evs in d.records for e in evs) == 2 * new_cost  # sent twice
    windows = {w["budget_id"]: w for w in done.diff["budgets"]}
    assert windows["b-open"]["state"].startswith("open") and windows["b-open"]["delta_nanos"] == new_cost
    assert windows["b-open"]["events"] == 12
    assert windows["b-closed"]["state"].startswith("closed") and windows["b-closed"]["events"] == 5
    day = (NOW - timedelta(days=5)).replace(hour=0, minute=0, second=0)
    assert windows["b-closed"]["window_start"] == day.strftime("%Y-%m-%dT%H:%M:%S.000Z")
