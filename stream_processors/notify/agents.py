"""Notify stage wiring: spendstream.budget.alerts -> Notifier (webhooks, e-mail) -> alert_deliveries.

Offsets: an alert record is acked when every one of its channels is final (delivered, gave_up or
refused) and that outcome is recorded in ``alert_deliveries``. Alerts are delivered concurrently
(one task each, up to ``MAX_PENDING_ALERTS``), so a channel that is still retrying holds back the
committed offset of its partition but not the delivery of the alerts behind it. After a crash or
a rebalance the alerts from the committed offset on are read again; ``Notifier`` (its delivery
history re-read from ``alert_deliveries`` at every assignment) then skips the channels recorded
as final and continues the others (attempt numbers and retry horizon included). A re-sent alert (the budgets stage sends an alert again after its own
crash, with the same alert_id) goes the same way. See notifier.py for the exact guarantee.

Poison never stalls the stage (``retry.py``): a record that is not an alert goes to usage.dlq with
the reason. An alert whose delivery fails because of its content (its attempt row refused by
ClickHouse as data, or one of ``retry.CONTENT_ERRORS``) is recorded as refused on every channel,
with the reason (``DeliveryStore.record_refusal``: final, never retried), or dead-lettered if
even that row is refused; either way it is acked and counted in
``spendstream_stage_poison_records_total{stage="notify",reason}``. Any other error is a bug and
stops the worker.

``stream_wait_empty`` is off for this app: Faust would otherwise block a rebalance or shutdown
until every alert in flight is final, which can take up to the retry horizon. Instead, the
deliveries of revoked partitions are cancelled (the new owner resumes them from the record).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import faust
import orjson
from prometheus_client import Counter

from spendstream.alerting import Alert, BadAlert, DeliveryStore, Sender, UnstorableAttempt, parse_alert
from spendstream.contracts import dlq_envelope
from spendstream.settings import Settings
from spendstream.topics import BUDGET_ALERTS, USAGE_DLQ
from stream_processors.notify.notifier import Notifier
from stream_processors.runtime.producer import StageProducer
from stream_processors.runtime.retry import (
    CONTENT_ERRORS,
    POISON,
    is_data_error,
    reason_of,
    retry_forever,
)

log = logging.getLogger(__name__)

#: alerts consumed but not yet final; at this many the stage stops reading (backpressure)
MAX_PENDING_ALERTS = 10_000

STAGE = "notify"
BAD_RECORDS = Counter(
    "spendstream_notify_bad_records_total", "budget.alerts records that are not alerts (dead-lettered)"
)


class NotifyStage:
    def __init__(self, app: faust.App, settings: Settings):
        self.app = app
        self.settings = settings
        self.topic_name = BUDGET_ALERTS.name
        self.notifier: Notifier | None = None
        self.output = StageProducer(settings, STAGE)
        #: per partition: waiters that ack an alert record once its alert is final
        self.waiters: dict[int, dict[asyncio.Task, str]] = defaultdict(dict)

    async def run(self, stream: faust.StreamT) -> None:
        await self.output.start()
        store = DeliveryStore(self.settings, is_data_error=is_data_error)
        self.notifier = Notifier(self.settings, store, Sender(self.settings))
        self.notifier.start()
        stream = stream.noack()
        slots = asyncio.Semaphore(MAX_PENDING_ALERTS)
        try:
            async for event in stream.events():
                try:
                    alert = parse_alert(event.message.value)
                except BadAlert as exc:
                    BAD_RECORDS.inc()
                    await self._dead_letter(event, f"not an alert: {exc}", "bad_alert")
                    await stream.ack(event)
                    continue
                await slots.acquire()
                delivery = self.notifier.submit(alert)
                waiter = asyncio.create_task(self._ack_when_final(stream, event, delivery, slots, alert))
                self.waiters[event.message.partition][waiter] = alert.alert_id
        finally:
            for waiters in self.waiters.values():
                for waiter in waiters:
                    waiter.cancel()
            await self.notifier.close()
            await self.output.stop()

    async def _ack_when_final(
        self, stream: faust.StreamT, event: faust.EventT, delivery: asyncio.Future, slots: asyncio.Semaphore,
        alert: Alert,
    ) -> None:  # fmt: skip
        partition = event.message.partition
        try:
            try:
                await delivery
            except (UnstorableAttempt, *CONTENT_ERRORS) as exc:
                log.exception("alert %s cannot be delivered because of its content; refusing it", alert.alert_id)
                await self._refuse(event, alert, reason_of(exc, "not delivered: "))
            await stream.ack(event)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - a bug, not an IO error (those are retried)
            log.exception("delivering alert %r failed; stopping the worker", event.message.key)
            await self.app.crash(exc)
            return
        finally:
            slots.release()
            self.waiters[partition].pop(asyncio.current_task(), None)

    async def _refuse(self, event: faust.EventT, alert: Alert, reason: str) -> None:
        """Record ``alert`` as refused on every channel; dead-letter it if even that is refused."""
        assert self.notifier is not None
        try:
            async for attempt in retry_forever(STAGE, "insert alert_deliveries"):
                with attempt:
                    await self.notifier.store.record_refusal(alert, reason)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            await self._dead_letter(event, f"{reason}; recording the refusal failed too: {exc}", "unrecordable_alert")
            return
        POISON.labels(STAGE, "refused_alert").inc()

    async def _dead_letter(self, event: faust.EventT, reason: str, label: str) -> None:
        m = event.message
        log.error("budget.alerts %d@%d dead-lettered: %s", m.partition, m.offset, reason[:500])
        envelope = dlq_envelope(STAGE, reason[:1000], self.topic_name, m.partition, m.offset, value=m.value)
        await self.output.send_all([(USAGE_DLQ.name, m.partition, m.key, orjson.dumps(envelope))])
        POISON.labels(STAGE, label).inc()

    def on_revoked(self, partitions: set[int]) -> None:
        assert self.notifier is not None
        for partition in partitions:
            waiters = self.waiters.pop(partition, {})
            for waiter in waiters:
                waiter.cancel()
            self.notifier.cancel(waiters.values())
            if waiters:
                log.info("partition %d revoked: %d alert(s) in flight handed over", partition, len(waiters))


def register(app: faust.App, settings: Settings) -> None:
    app.conf.stream_wait_empty = False
    # httpx logs every request at INFO; attempts are counted and recorded in alert_deliveries
    logging.getLogger("httpx").setLevel(logging.WARNING)
    alerts = app.topic(
        BUDGET_ALERTS.name, key_serializer="raw", value_serializer="raw", partitions=settings.kafka.partitions
    )
    stage = NotifyStage(app, settings)

    @app.agent(alerts, name="notify")
    async def notify(stream: faust.StreamT) -> None:
        await stage.run(stream)

    @app.on_partitions_revoked.connect
    async def handover(sender: faust.App, revoked: set, **kwargs) -> None:
        if stage.notifier is not None:
            stage.on_revoked({tp.partition for tp in revoked if tp.topic == stage.topic_name})

    @app.on_partitions_assigned.connect
    async def take_over(sender: faust.App, assigned: set, **kwargs) -> None:
        # the previous owner of these partitions may have delivered some of their alerts
        if stage.notifier is not None:
            stage.notifier.reload_history()
