"""Alerting's ClickHouse side as the notify stage uses it: channels (``webhooks``, read) and the
delivery record (``alert_deliveries``, written). ``budget_alerts`` is the budgets stage's.

Nothing here runs per alert on the way to a receiver, except the first look-up of a webhook
created since the last refresh: the delivery record of the recent past is read in one query
(``load_histories``, at each partition assignment) and the live webhooks every
``CHANNEL_REFRESH_S`` (``refresh_channels``). Under load the embedded ClickHouse answers in
hundreds of milliseconds, which a per-alert query would add to every alert's latency.

An attempt ClickHouse refuses as data raises :class:`UnstorableAttempt`, which no retry predicate
takes for a passing fault: the alert's delivery fails at once instead of retrying the insert
forever and holding back its partition's commits. The notify agent then records the alert as
refused (:meth:`DeliveryStore.record_refusal`) or dead-letters it. What counts as a data error is
the stages' one classification (``stream_processors/runtime/retry.is_data_error``), handed in by the
stage: this package imports no service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.asyncclient import AsyncClient

from spendstream.alerting.channels import EMAIL_FORMAT, Channel
from spendstream.alerting.payloads import Alert
from spendstream.alerting.retries import REFUSED
from spendstream.alerting.targets import is_email_channel
from spendstream.clickhouse import get_async_client
from spendstream.settings import Settings

#: how often the live webhooks are re-read: a deleted or changed webhook takes effect within it
CHANNEL_REFRESH_S = 5.0

DELIVERY_COLUMNS = (
    "tenant", "alert_id", "channel", "format", "attempt", "attempted_at", "outcome", "http_status", "error",
    "duration_ms",
)  # fmt: skip

#: (tenant, alert_id) -> channel -> what the record says about it
Histories = dict[tuple[str, str], dict[str, "ChannelHistory"]]
#: the attempt number of a refusal recorded for an alert the stage could not handle: the highest
#: UInt32, so it is every history's last attempt (``argMax(outcome, attempt)``), a final outcome
POISON_ATTEMPT = 2**32 - 1


class UnstorableAttempt(Exception):
    """ClickHouse refused an attempt's row as data; ``__cause__`` is its error."""


@dataclass(frozen=True)
class ChannelHistory:
    """What alert_deliveries says about one (alert, channel): attempts so far, the last outcome
    and when the first attempt was made (the retry horizon counts from there)."""

    attempts: int
    last_outcome: str
    first_attempt_at: datetime


@dataclass(frozen=True)
class Attempt:
    tenant: str
    alert_id: str
    channel: str
    format: str
    attempt: int
    attempted_at: datetime
    outcome: str
    http_status: int | None
    error: str
    duration_ms: int

    def row(self) -> list:
        return [getattr(self, c) for c in DELIVERY_COLUMNS]


class DeliveryStore:
    """``is_data_error``: whether ClickHouse refused a write because of its content (the
    attempt then raises UnstorableAttempt; any other error propagates as it is)."""

    def __init__(self, settings: Settings, *, is_data_error: Callable[[BaseException], bool]):
        self._settings = settings
        self._is_data_error = is_data_error
        self._client: AsyncClient | None = None
        # deliveries start concurrently: without it each would open (and leak) its own client
        self._connecting = asyncio.Lock()
        self._channels: dict[tuple[str, str], Channel] = {}

    async def _ch(self) -> AsyncClient:
        async with self._connecting:
            if self._client is None:
                self._client = await get_async_client(self._settings)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def refresh_channels(self) -> None:
        """Replace the cached webhooks with every live one (a deleted webhook drops out)."""
        ch = await self._ch()
        result = await ch.query("SELECT tenant, id, format, url, email, secret FROM webhooks FINAL WHERE deleted = 0")
        self._channels = {
            (tenant, webhook_id): Channel(webhook_id, fmt, url=url, email=email, secret=secret)
            for tenant, webhook_id, fmt, url, email, secret in result.result_rows
        }

    async def channel(self, tenant: str, channel_id: str) -> Channel | None:
        """The channel a budget's entry names, or None if the tenant has no such (live) webhook."""
        if is_email_channel(channel_id):
            return Channel(channel_id, EMAIL_FORMAT, email=channel_id)
        cached = self._channels.get((tenant, channel_id))
        if cached is not None:
            return cached
        # created since the last refresh (or unknown): ask now
        ch = await self._ch()
        result = await ch.query(
            "SELECT format, url, email, secret FROM webhooks FINAL"
            " WHERE tenant = {tenant:String} AND id = {id:String} AND deleted = 0",
            parameters={"tenant": tenant, "id": channel_id},
        )
        if not result.result_rows:
            return None
        fmt, url, email, secret = result.result_rows[0]
        found = self._channels[(tenant, channel_id)] = Channel(channel_id, fmt, url=url, email=email, secret=secret)
        return found

    async def load_histories(self, since: datetime) -> Histories:
        """Every (alert, channel) with an attempt recorded at or after ``since``."""
        ch = await self._ch()
        result = await ch.query(
            "SELECT tenant, alert_id, channel, max(attempt), argMax(outcome, attempt), min(attempted_at)"
            " FROM alert_deliveries WHERE attempted_at >= {since:DateTime64(3, 'UTC')}"
            " GROUP BY tenant, alert_id, channel",
            parameters={"since": since},
        )
        out: Histories = {}
        for tenant, alert_id, channel, attempts, outcome, first in result.result_rows:
            out.setdefault((tenant, alert_id), {})[channel] = ChannelHistory(int(attempts), outcome, _utc(first))
        return out

    async def record(self, attempt: Attempt) -> None:
        try:
            await insert_attempt(await self._ch(), attempt)
        except Exception as exc:
            if self._is_data_error(exc):
                raise UnstorableAttempt(f"alert_deliveries refused the attempt: {exc}") from exc
            raise

    async def record_refusal(self, alert: Alert, reason: str) -> None:
        """Every channel of ``alert`` refused with ``reason``: final, never tried again."""
        now = datetime.now(UTC)
        rows = [Attempt(alert.tenant, alert.alert_id, channel, "", POISON_ATTEMPT, now, REFUSED, None, reason, 0).row()
                for channel in alert.channels]  # fmt: skip
        await (await self._ch()).insert("alert_deliveries", rows, column_names=list(DELIVERY_COLUMNS))


async def insert_attempt(ch: AsyncClient, attempt: Attempt) -> None:
    await ch.insert("alert_deliveries", [attempt.row()], column_names=list(DELIVERY_COLUMNS))


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)
