"""Delivery of alerts to their channels, with retries, per-endpoint isolation and a durable record.

``Notifier.submit(alert)`` starts (or joins) one task per alert; that task runs one task per
channel and finishes when every channel is final (delivered, gave_up or refused). Each channel:
1. checks what ``alert_deliveries`` held for (alert, channel) when the history was last loaded
   (``reload_history``: at start and at every partition assignment, the attempts of the last
   ``history_window``): a final outcome means "done before" (a re-sent alert, or a replay after a
   crash) and nothing is sent; otherwise the attempt count and the retry horizon continue from
   the recorded attempts. Alerts finished since then are remembered in memory;
2. looks the channel up (webhook id -> ``webhooks`` row, tenant-scoped; or an e-mail address);
3. attempts delivery while holding the endpoint's slot (``PER_ENDPOINT_CONCURRENCY`` requests at
   a time per webhook URL, or per SMTP server), so a slow endpoint only delays its own deliveries;
4. records the attempt (retrying ClickHouse until it takes it) before deciding anything else;
5. sleeps the backoff OUTSIDE the slot, and tries again.

Guarantee per (alert_id, channel): at least one attempt, and at most one successful delivery
recorded. A receiver can get a second copy only if this process dies (or loses the partition)
between a 2xx and the record landing; the copy carries the same ``Idempotency-Key`` (generic) /
``dedup_key`` (PagerDuty) / ``Message-ID`` (e-mail), so such receivers drop it. Slack has no
idempotency key. The budgets stage re-sends an alert right after its own restart; one re-sent
later than ``history_window`` (max(pricing.dedupe_window_hours, 2 x notify.retry_horizon_s)) after its delivery
would be delivered again.

What one attempt sends, how its answer is judged and where it is recorded is
``spendstream.alerting``'s (shared with the query API's test alerts); this module adds only what
the stage needs: alerts in flight, concurrency per endpoint, retries over time and its metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.exceptions import ClickHouseError
from prometheus_client import Counter, Gauge, Histogram

from spendstream.alerting import (
    CHANNEL_REFRESH_S,
    DELIVERED,
    FAILED,
    FINAL_OUTCOMES,
    REFUSED,
    Alert,
    Attempt,
    AttemptResult,
    ChannelHistory,
    DeliveryStore,
    Histories,
    RetryPolicy,
    Sender,
    attempt_outcome,
    created_at,
    endpoint_of,
)
from spendstream.settings import Settings
from stream_processors.runtime.retry import is_transient, retry_forever

log = logging.getLogger(__name__)

STAGE = "notify"
#: requests in flight at once to one endpoint (a webhook URL, or the SMTP server)
PER_ENDPOINT_CONCURRENCY = 4
#: alert ids remembered as finished, so a re-sent alert needs no ClickHouse look-up
DONE_MEMORY = 100_000
RETRYABLE_STORE_ERRORS = (ClickHouseError, OSError)


def _store_error_is_retryable(exc: BaseException) -> bool:
    # the stages' one classification: a data error is final (store.record turns it into a refused
    # delivery), so only what can pass later is retried
    return is_transient(exc)


ATTEMPTS = Counter(
    "spendstream_notify_attempts_total", "Delivery attempts by channel format and outcome", ["format", "outcome"]
)
ALERTS = Counter("spendstream_notify_alerts_total", "Alerts by how they ended", ["result"])
ATTEMPT_SECONDS = Histogram(
    "spendstream_notify_attempt_seconds", "Duration of one delivery attempt", ["format"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
ALERT_AGE = Histogram(
    "spendstream_notify_alert_age_seconds", "Alert emitted by the budgets stage -> delivered to a channel", ["format"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)  # fmt: skip
IN_FLIGHT = Gauge(
    "spendstream_notify_alerts_in_flight", "Alerts with a channel not yet final", multiprocess_mode="livesum"
)


class Notifier:
    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        sender: Sender,
        *,
        policy: RetryPolicy | None = None,
        rand: Callable[[], float] = random.random,
    ):
        self.store = store
        self.sender = sender
        self.policy = policy or RetryPolicy(horizon_s=settings.notify.retry_horizon_s)
        self.rand = rand
        # re-sent alerts come within minutes (the budgets stage's restart); an alert still retrying
        # is re-read until its horizon has passed
        self.history_window = timedelta(
            seconds=max(settings.pricing.dedupe_window_hours * 3600, 2 * self.policy.horizon_s)
        )
        self._running: dict[str, asyncio.Task[dict[str, str]]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._histories: Histories = {}
        self._history_loaded = asyncio.Event()
        self._background: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        """Load the delivery history and keep the webhooks fresh (call from the running loop)."""
        self.reload_history()
        self._background["channels"] = asyncio.create_task(self._refresh_channels_forever(), name="notify-channels")

    def reload_history(self) -> None:
        """Deliveries wait until the record of the recent past is read again (after a partition
        assignment: another worker may have delivered the partition's alerts meanwhile)."""
        self._history_loaded.clear()
        previous = self._background.pop("history", None)
        if previous is not None:
            previous.cancel()
        self._background["history"] = asyncio.create_task(self._load_history(), name="notify-history")

    async def _load_history(self) -> None:
        since = datetime.now(UTC) - self.history_window
        async for attempt in retry_forever(STAGE, "read alert_deliveries", _store_error_is_retryable):
            with attempt:
                self._histories = await self.store.load_histories(since)
        self._history_loaded.set()
        log.info("delivery history loaded: %d alerts since %s", len(self._histories), since.isoformat())

    async def _refresh_channels_forever(self) -> None:
        while True:
            try:
                await self.store.refresh_channels()
            except RETRYABLE_STORE_ERRORS as exc:
                log.warning("reading webhooks failed (%r); keeping the last set", exc)
            await asyncio.sleep(CHANNEL_REFRESH_S)

    def submit(self, alert: Alert) -> asyncio.Future[dict[str, str]]:
        """Deliver ``alert`` to its channels; the future resolves to {channel: final outcome}
        ({} when this process already finished the alert). Submitting an alert_id that is
        already running joins that run."""
        if alert.alert_id in self._done:
            ALERTS.labels("already_done").inc()
            done: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
            done.set_result({})
            return done
        task = self._running.get(alert.alert_id)
        if task is None:
            task = asyncio.create_task(self._deliver(alert), name=f"notify-{alert.alert_id}")
            self._running[alert.alert_id] = task
            IN_FLIGHT.inc()
            task.add_done_callback(lambda t, alert_id=alert.alert_id: self._finished(alert_id, t))
        else:
            ALERTS.labels("joined").inc()
        return task

    def _finished(self, alert_id: str, task: asyncio.Task) -> None:
        if self._running.get(alert_id) is task:
            del self._running[alert_id]
        IN_FLIGHT.dec()
        if not task.cancelled() and task.exception() is None:
            self._done[alert_id] = None
            if len(self._done) > DONE_MEMORY:
                self._done.popitem(last=False)

    def cancel(self, alert_ids: Iterable[str]) -> None:
        """Stop delivering these alerts (their partition went to another worker, which resumes
        them from alert_deliveries)."""
        for alert_id in alert_ids:
            # forgotten now, not when the task has unwound: the alert may be submitted again at once
            task = self._running.pop(alert_id, None)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        tasks = [*self._running.values(), *self._background.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sender.close()
        await self.store.close()

    async def _deliver(self, alert: Alert) -> dict[str, str]:
        await self._history_loaded.wait()
        history = self._histories.get((alert.tenant, alert.alert_id), {})
        outcomes = await asyncio.gather(*(self._deliver_to(alert, c, history.get(c)) for c in alert.channels))
        result = dict(zip(alert.channels, outcomes))
        ALERTS.labels("finished").inc()
        return result

    async def _deliver_to(self, alert: Alert, channel_id: str, history: ChannelHistory | None) -> str:
        if history is not None and history.last_outcome in FINAL_OUTCOMES:
            return history.last_outcome
        attempt = history.attempts if history else 0
        first_at = history.first_attempt_at if history else None
        async for retry in retry_forever(STAGE, "read webhooks", _store_error_is_retryable):
            with retry:
                channel = await self.store.channel(alert.tenant, channel_id)
        if channel is None:
            await self._record(
                alert,
                channel_id,
                "",
                attempt + 1,
                datetime.now(UTC),
                REFUSED,
                AttemptResult("refused", 0, error="no such webhook for this tenant (deleted?)"),
            )
            return REFUSED
        # per webhook URL (two tenants' webhooks on one host stay independent) or per SMTP server
        slot = self._slots.setdefault(endpoint_of(channel), asyncio.Semaphore(PER_ENDPOINT_CONCURRENCY))
        while True:
            attempt += 1
            async with slot:
                attempted_at = datetime.now(UTC)
                result = await self.sender.send(channel, alert)
            first_at = first_at or attempted_at
            elapsed = (datetime.now(UTC) - first_at).total_seconds()
            outcome, delay = attempt_outcome(
                result.verdict, attempt, elapsed, result.retry_after_s, self.policy, self.rand
            )
            await self._record(alert, channel_id, channel.format, attempt, attempted_at, outcome, result)
            if delay is None:
                return outcome
            await asyncio.sleep(delay)

    async def _record(
        self,
        alert: Alert,
        channel_id: str,
        fmt: str,
        attempt: int,
        attempted_at: datetime,
        outcome: str,
        result: AttemptResult,
    ) -> None:
        ATTEMPTS.labels(fmt or "unknown", outcome).inc()
        ATTEMPT_SECONDS.labels(fmt or "unknown").observe(result.duration_ms / 1000)
        emitted = created_at(alert)
        if outcome == DELIVERED and emitted is not None:
            ALERT_AGE.labels(fmt).observe((datetime.now(UTC) - emitted).total_seconds())
        if outcome not in (DELIVERED, FAILED):
            # %r: a channel or an error text with line breaks must not forge log lines
            log.warning(
                "alert %s to %r: %s after %d attempt(s): %r", alert.alert_id, channel_id, outcome, attempt, result.error
            )
        row = Attempt(alert.tenant, alert.alert_id, channel_id, fmt, attempt, attempted_at, outcome,
                      result.http_status, result.error, result.duration_ms)  # fmt: skip
        async for retry in retry_forever(STAGE, "insert alert_deliveries", _store_error_is_retryable):
            with retry:
                await self.store.record(row)
