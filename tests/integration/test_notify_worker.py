"""The notify stage as it runs (``spendstream processors --stages notify``, a Faust worker) on a
broker of its own: alerts produced onto spendstream.budget.alerts reach a real receiver; an alert
re-sent on the topic is delivered once; SIGKILL mid-delivery loses nothing and re-sends nothing
whose delivery was recorded."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from notify_support import NotifyWorker, Receiver, alert_value, deliveries, insert_webhook, wait_until
from query_api_stack import migrate
from stage_support import wait_committed

from spendstream.alerting import IDEMPOTENCY_HEADER
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.kafka import producer_kwargs
from spendstream.topics import BUDGET_ALERTS, ensure_topics
from stream_processors.notify.notifier import PER_ENDPOINT_CONCURRENCY

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "worker_tenant"
GROUP = "spendstream-notify"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    # a broker of its own: no other test's alerts on the topic, no other notify group's offsets
    with EmbeddedKafka(log_path=tmp_path_factory.mktemp("notify-kafka") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="module")
def settings(make_settings, broker):
    s = make_settings(
        kafka={"bootstrap_servers": broker.bootstrap, "profile": "embedded", "partitions": 2},
        notify={"timeout_s": 2.0, "webhook": {"allow_private": True}},
    )
    migrate(s)
    return s


@pytest.fixture(scope="module")
async def topic(settings):
    await ensure_topics(settings, (BUDGET_ALERTS,))
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()

    async def send(value: dict, partition: int = 0) -> None:
        # one record per batch: Tansu's end offsets are right for those (EMBEDDED-STACK.md)
        await producer.send_and_wait(BUDGET_ALERTS.name, orjson.dumps(value), key=value["alert_id"].encode(),
                                     partition=partition)  # fmt: skip

    yield send
    await producer.stop()


@pytest.fixture(scope="module")
async def worker(settings, topic, tmp_path_factory):
    logs = tmp_path_factory.mktemp("notify-worker")
    holder = {"worker": NotifyWorker(settings, logs / "notify-1.log")}
    await holder["worker"].ready()
    yield holder
    holder["worker"].stop()


async def test_an_alert_sent_twice_on_the_topic_is_delivered_once(settings, topic, worker):
    async with Receiver() as receiver:
        insert_webhook(settings, TENANT, "wh_dup", "generic", receiver.script("/dup", [200], delay_s=0.2), "s" * 16)
        twice, other, last = (alert_value(f"al_dup_{n}", TENANT, ["wh_dup"]) for n in ("a", "b", "c"))
        await topic(twice)
        await topic(twice)  # back to back: the first copy is still being delivered
        await topic(other)
        await wait_until(lambda: {r.headers[IDEMPOTENCY_HEADER] for r in receiver.at("/dup")} >= {"al_dup_a", "al_dup_b"},
                         "the first deliveries", timeout=30)  # fmt: skip
        await topic(twice)  # after it was delivered
        await topic(last)
        await wait_until(lambda: any(r.headers[IDEMPOTENCY_HEADER] == "al_dup_c" for r in receiver.at("/dup")),
                         "the last alert", timeout=30)  # fmt: skip
        # every record read and acked (committed) before we count
        await wait_committed(settings, GROUP, BUDGET_ALERTS.name, {0: 5}, timeout=30)
        received = Counter(r.headers[IDEMPOTENCY_HEADER] for r in receiver.at("/dup"))
    assert received == {"al_dup_a": 1, "al_dup_b": 1, "al_dup_c": 1}
    rows = [r for r in deliveries(settings, TENANT) if r["alert_id"].startswith("al_dup_")]
    assert [(r["alert_id"], r["attempt"], r["outcome"]) for r in rows] == [
        ("al_dup_a", 1, "delivered"),
        ("al_dup_b", 1, "delivered"),
        ("al_dup_c", 1, "delivered"),
    ]


@pytest.mark.faults
async def test_sigkill_mid_delivery_loses_nothing_and_resends_nothing_recorded(
    settings, topic, worker, tmp_path_factory
):
    count = 24
    ids = [f"al_kill_{i:02d}" for i in range(count)]
    async with Receiver() as receiver:
        insert_webhook(settings, TENANT, "wh_kill", "generic", receiver.script("/kill", [200], delay_s=0.3), "k" * 16)
        for i, alert_id in enumerate(ids):
            await topic(alert_value(alert_id, TENANT, ["wh_kill"]), partition=i % 2)
        await wait_until(lambda: len(receiver.at("/kill")) >= count // 3, "a third of the deliveries", timeout=30)
        worker["worker"].kill()
        recorded_before_kill = {r["alert_id"] for r in deliveries(settings, TENANT)
                                if r["alert_id"].startswith("al_kill_") and r["outcome"] == "delivered"}  # fmt: skip
        assert 0 < len(recorded_before_kill) < count, "the kill must land mid-stream"

        worker["worker"] = NotifyWorker(settings, tmp_path_factory.mktemp("notify-worker") / "notify-2.log")
        await worker["worker"].ready()

        def all_recorded() -> bool:
            rows = [r for r in deliveries(settings, TENANT) if r["alert_id"].startswith("al_kill_")]
            return {r["alert_id"] for r in rows if r["outcome"] == "delivered"} == set(ids)

        await wait_until(all_recorded, "every alert recorded as delivered", timeout=60, step=0.2)
        received = Counter(r.headers[IDEMPOTENCY_HEADER] for r in receiver.at("/kill"))
    assert set(received) == set(ids), "an alert was lost"
    resent = {alert_id: n for alert_id, n in received.items() if n > 1}
    assert not resent.keys() & recorded_before_kill, f"re-sent after its delivery was recorded: {resent}"
    # only deliveries caught by the kill can come twice: those waiting for the receiver (at most the
    # endpoint's concurrency) and those answered but not yet recorded (as many again at most)
    assert len(resent) <= 2 * PER_ENDPOINT_CONCURRENCY and all(n == 2 for n in resent.values()), resent
    rows = [r for r in deliveries(settings, TENANT) if r["alert_id"].startswith("al_kill_")]
    assert Counter(r["alert_id"] for r in rows if r["outcome"] == "delivered") == Counter(ids)
