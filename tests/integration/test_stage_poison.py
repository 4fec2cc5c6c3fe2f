"""Poison never stalls a stage, on the real embedded broker and ClickHouse: a record a stage cannot
process, encode or store because of its content goes to spendstream.usage.dlq with the reason (an
alert in notify: a refused delivery) and the stage goes on with the next record; transient errors
are the only ones retried (stream_processors/runtime/retry.py).

- pricing: a raw record whose price overflowed Int64 (2**63 tokens; a client price of 1e30 USD)
  crashed the stage on every replay; its events are dead-lettered, the rest priced;
- budgets: an alert ``budget_alerts`` refuses (Decimal(18, 4) overflow of percent_used: spend
  10^15 % of a 1 nano-USD limit) was retried forever, stalling every tenant's commits;
- notify: records that are not alerts are dead-lettered; a delivery row ClickHouse refuses fails
  the alert at once, and the refusal recorded instead is final;
- sink and the shared classification: what ClickHouse answers is sorted into data and transient.
"""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from notify_support import Receiver, alert_value, insert_webhook, wait_until
from stage_support import (
    FAST_BATCHING,
    StageWorker,
    make_event,
    migrate,
    produce,
    raw_record,
    read_topic,
    stage_settings,  # noqa: F401 - fixture
    wait_committed,
)

from spendstream.alerting import (
    IDEMPOTENCY_HEADER,
    POISON_ATTEMPT,
    REFUSED,
    Attempt,
    DeliveryStore,
    UnstorableAttempt,
    parse_alert,
)
from spendstream.budgets import Budget
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.contracts import record_key, usd_to_nanos
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.money import MAX_TOKENS_PER_EVENT
from spendstream.topics import BUDGET_ALERTS, USAGE_DLQ, USAGE_PRICED, USAGE_RAW
from stream_processors.runtime.retry import CLICKHOUSE_DATA_ERRORS, is_data_error, is_transient
from stream_processors.sink.logic import Insert, PricedRecord
from stream_processors.sink.writer import UsageEventsWriter

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "acme"
UTC = UTC
#: noon yesterday (UTC): inside the budgets stage's allowed lateness, far from a window edge
EVENT_TIME = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)


def dlq_values(records) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


# ---------------------------------------------------------------- pricing


async def test_pricing_dead_letters_an_overflowing_price_and_prices_the_next_record(stage_settings, tmp_path):
    s = stage_settings
    overflowing = [
        make_event("huge-tokens", "p1", 1, input_tokens=2**63),  # * 2,500 nano-USD: no int64 holds it
        make_event("huge-client-price", "p1", 2, cost_usd="1e30"),
        make_event("fine-1", "p1", 3),
    ]
    fine = [make_event("fine-2", "p1", 4)]
    await produce(s, USAGE_RAW.name, [raw_record(TENANT, "p1", overflowing), raw_record(TENANT, "p1", fine)])
    worker = StageWorker(s, "pricing", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        priced = await read_topic(s, USAGE_PRICED.name, lambda rs: len(rs) >= 2, what="both records priced")
        dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 1, what="the overflowing events")
        ends = {r.partition: r.offset + 1 for r in priced}
        await wait_committed(s, "spendstream-pricing", USAGE_RAW.name, ends)
        assert worker.alive()
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert [[e["event_id"] for e in orjson.loads(r.value)["events"]] for r in priced] == [["fine-1"], ["fine-2"]]
    assert all(e["cost_nanos"] > 0 for r in priced for e in orjson.loads(r.value)["events"])
    (dead,) = dlq_values(dlq)
    assert (dead["stage"], dead["src"]["topic"], dead["src"]["offset"]) == ("pricing", USAGE_RAW.name, 0)
    reasons = {e["event"]["event_id"]: e["reason"] for e in dead["events"]}
    assert reasons["huge-tokens"] == f"token counts must be <= {MAX_TOKENS_PER_EVENT} per field"
    assert reasons["huge-client-price"].startswith("cost_usd must be")
    assert metrics['spendstream_stage_poison_records_total{reason="invalid_events",stage="pricing"}'] == 1


# ---------------------------------------------------------------- budgets


def priced_record(project: str, offset: int, event_id: str, cost_nanos: int) -> tuple[bytes, bytes, int]:
    """A usage.priced record as the pricing stage writes it (partition 0, src offset ``offset``)."""
    stamp = EVENT_TIME.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    event = {"event_id": event_id, "timestamp": stamp, "project": project, "agent": "a", "provider": "openai",
             "model": "gpt-4o", "cost_nanos": cost_nanos, "pricing_status": "priced"}  # fmt: skip
    env = {"v": 1, "tenant": TENANT, "project": project, "received_at": stamp,
           "src": {"partition": 0, "offset": offset}, "events": [event]}  # fmt: skip
    return record_key(TENANT, project), orjson.dumps(env), 0


def stored_alerts(settings) -> list[tuple[str, str]]:
    client = get_client(settings)
    try:
        return client.query("SELECT budget_id, toString(threshold) FROM budget_alerts FINAL ORDER BY 1, 2").result_rows
    finally:
        client.close()


async def test_budgets_dead_letters_an_alert_clickhouse_refuses_and_commits_past_it(stage_settings, tmp_path):
    s = stage_settings
    tiny = Budget(TENANT, "b-tiny", "one nano", {"project": "p1"}, "daily", "UTC", 1, forecast=False)
    normal = Budget(TENANT, "b-normal", "ten dollars", {"project": "p2"}, "daily", "UTC", usd_to_nanos("10"),
                    forecast=False)  # fmt: skip
    client = get_client(s)
    try:
        for budget in (tiny, normal):
            insert_budget(client, budget, version=time.time_ns() // 1000)
    finally:
        client.close()
    # 10,000 USD against a 1 nano-USD limit: percent_used is 10^15, which Decimal(18, 4) (an Int64
    # of ten-thousandths) cannot hold
    await produce(s, USAGE_PRICED.name, [priced_record("p1", 0, "ev-tiny", usd_to_nanos("10000"))])
    worker = StageWorker(s, "budgets", tmp_path)
    try:
        await asyncio.to_thread(worker.wait_healthy)
        dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 3, what="three refused alerts")
        # the record after the poison: its alert reaches budget_alerts, so the commits went on
        await produce(s, USAGE_PRICED.name, [priced_record("p2", 1, "ev-normal", usd_to_nanos("6"))])
        await wait_until(lambda: ("b-normal", "50") in stored_alerts(s), "the next alert recorded", timeout=60)
        sent = await read_topic(s, BUDGET_ALERTS.name, lambda rs: len(rs) >= 4, what="every alert sent")
        assert worker.alive()
        metrics = worker.metrics()
    finally:
        worker.stop()
    assert stored_alerts(s) == [("b-normal", "50")]
    dead = dlq_values(dlq)
    assert {(d["stage"], d["src"]["topic"], d["reason"]) for d in dead} == {
        ("budgets", "spendstream.budget.deltas", "1 alert not recorded in budget_alerts")
    }
    refused = [e for d in dead for e in d["events"]]
    assert sorted(Decimal(e["event"]["threshold"]) for e in refused) == [50, 80, 100]
    assert all(e["event"]["budget_id"] == "b-tiny" and "percent_used" in e["reason"] for e in refused)
    # the alerts themselves went out before ClickHouse refused their history rows
    assert {orjson.loads(r.value)["alert_id"] for r in sent} >= {e["event"]["alert_id"] for e in refused}
    assert metrics['spendstream_stage_poison_records_total{reason="clickhouse_client_data",stage="budgets"}'] == 3


# ---------------------------------------------------------------- notify


async def test_notify_dead_letters_records_that_are_not_alerts_and_delivers_the_next(make_settings, tmp_path):
    with EmbeddedKafka(log_path=tmp_path / "tansu.log") as broker:
        s = make_settings(kafka={"bootstrap_servers": broker.bootstrap},
                          **FAST_BATCHING, notify={"webhook": {"allow_private": True}})  # fmt: skip
        migrate(s)
        async with Receiver() as receiver:
            insert_webhook(s, TENANT, "wh", "generic", receiver.script("/hook", [200]), "s" * 16)
            good = alert_value("al_after_poison", TENANT, ["wh"])
            records = [(b"k", b"\x00 not json", 0), (b"k", orjson.dumps({"alert_id": "al_x", "tenant": TENANT}), 0),
                       (good["alert_id"].encode(), orjson.dumps(good), 0)]  # fmt: skip
            await produce(s, BUDGET_ALERTS.name, records)
            worker = StageWorker(s, "notify", tmp_path)
            try:
                await asyncio.to_thread(worker.wait_healthy)
                await wait_until(lambda: receiver.at("/hook"), "the alert after the poison delivered", timeout=60)
                dlq = await read_topic(s, USAGE_DLQ.name, lambda rs: len(rs) >= 2, what="both records")
                await wait_committed(s, "spendstream-notify", BUDGET_ALERTS.name, {0: 3})
                metrics = worker.metrics()
            finally:
                worker.stop()
    assert [r.headers[IDEMPOTENCY_HEADER] for r in receiver.at("/hook")] == ["al_after_poison"]
    dead = dlq_values(dlq)
    assert [(d["stage"], d["src"]["offset"], d["reason"].split(":")[0]) for d in dead] == [
        ("notify", 0, "not an alert"),
        ("notify", 1, "not an alert"),
    ]
    assert base64.b64decode(dead[0]["value_b64"]) == records[0][1]
    assert metrics['spendstream_stage_poison_records_total{reason="bad_alert",stage="notify"}'] == 2


async def test_a_delivery_row_clickhouse_refuses_fails_at_once_and_a_refusal_is_final(make_settings):
    s = make_settings()
    migrate(s)
    store = DeliveryStore(s, is_data_error=is_data_error)
    alert = parse_alert(alert_value("al_poison", TENANT, ["wh-1", "ops@example.com"]))
    now = datetime.now(UTC)
    try:
        await store.record(Attempt(TENANT, alert.alert_id, "wh-1", "generic", 1, now, "failed", 503, "HTTP 503", 12))
        with pytest.raises(UnstorableAttempt) as refused:
            # attempt is UInt32: what no retry can store
            await store.record(Attempt(TENANT, alert.alert_id, "wh-1", "generic", 2**32, now, "failed", None, "", 1))
        assert is_data_error(refused.value.__cause__) and not is_transient(refused.value)
        await store.record_refusal(alert, "not delivered: ValueError: bad content")
        history = (await store.load_histories(now - timedelta(minutes=1)))[(TENANT, alert.alert_id)]
    finally:
        await store.close()
    # the refusal is every channel's last attempt, so a restarted worker never tries it again
    assert {c: (h.attempts, h.last_outcome) for c, h in history.items()} == {
        "wh-1": (POISON_ATTEMPT, REFUSED),
        "ops@example.com": (POISON_ATTEMPT, REFUSED),
    }


# ---------------------------------------------------------------- the classification itself


def test_clickhouse_names_the_data_error_codes_as_retry_py_does(make_settings):
    client = get_client(make_settings(), database="system")
    try:
        names = client.query("SELECT arrayMap(c -> errorCodeToName(c), {codes:Array(Int32)})",
                             parameters={"codes": list(CLICKHOUSE_DATA_ERRORS.values())}).result_rows[0][0]  # fmt: skip
    finally:
        client.close()
    assert names == list(CLICKHOUSE_DATA_ERRORS)


def test_the_sink_tells_refused_data_from_an_unreachable_clickhouse(make_settings):
    s = make_settings()
    migrate(s)
    envelope = {"v": 1, "tenant": TENANT, "project": "p", "received_at": "2025-01-01T00:00:00.000Z",
                "src": {"partition": 0, "offset": 0},
                "events": [{"event_id": "x", "input_tokens": "many"}]}  # fmt: skip
    writer = UsageEventsWriter(s)
    try:
        with pytest.raises(DatabaseError) as refused:
            writer.insert(Insert("t-refused", [PricedRecord(0, 0, 0, 0, 0, 1, orjson.dumps(envelope))]))
    finally:
        writer.close()
    assert is_data_error(refused.value) and not is_transient(refused.value)
    down = UsageEventsWriter(make_settings(with_clickhouse=False))
    try:
        with pytest.raises(Exception) as unreachable:
            down.load_watermarks([0])
    finally:
        down.close()
    assert is_transient(unreachable.value) and not is_data_error(unreachable.value)
