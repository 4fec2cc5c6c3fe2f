"""The notify stage's ClickHouse side: channel look-ups (``webhooks``) and the delivery record
(``alert_deliveries``). The stage writes nothing else: ``budget_alerts`` is the budgets stage's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from clickhouse_connect.driver.asyncclient import AsyncClient

from spendstream.clickhouse import get_async_client
from spendstream.settings import Settings
from stream_processors.notify.logic import Channel, is_email_channel

#: how long a webhook row is served from memory: a deleted or changed webhook takes effect
#: within this time (look-ups of unknown ids are never cached)
CHANNEL_CACHE_S = 10.0

DELIVERY_COLUMNS = (
    "tenant", "alert_id", "channel", "format", "attempt", "attempted_at", "outcome", "http_status", "error",
    "duration_ms",
)  # fmt: skip


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
    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: AsyncClient | None = None
        # deliveries start concurrently: without it each would open (and leak) its own client
        self._connecting = asyncio.Lock()
        self._channels: dict[tuple[str, str], tuple[float, Channel]] = {}

    async def _ch(self) -> AsyncClient:
        async with self._connecting:
            if self._client is None:
                self._client = await get_async_client(self._settings)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def channel(self, tenant: str, channel_id: str) -> Channel | None:
        """The channel a budget's entry names, or None if the tenant has no such (live) webhook."""
        if is_email_channel(channel_id):
            return Channel(channel_id, "email", email=channel_id)
        cached = self._channels.get((tenant, channel_id))
        if cached and cached[0] > time.monotonic():
            return cached[1]
        ch = await self._ch()
        result = await ch.query(
            "SELECT format, url, email, secret FROM webhooks FINAL"
            " WHERE tenant = {tenant:String} AND id = {id:String} AND deleted = 0",
            parameters={"tenant": tenant, "id": channel_id},
        )
        if not result.result_rows:
            self._channels.pop((tenant, channel_id), None)
            return None
        fmt, url, email, secret = result.result_rows[0]
        found = Channel(channel_id, fmt, url=url, email=email, secret=secret)
        self._channels[(tenant, channel_id)] = (time.monotonic() + CHANNEL_CACHE_S, found)
        return found

    async def history(self, tenant: str, alert_id: str) -> dict[str, ChannelHistory]:
        ch = await self._ch()
        result = await ch.query(
            "SELECT channel, max(attempt), argMax(outcome, attempt), min(attempted_at) FROM alert_deliveries"
            " WHERE tenant = {tenant:String} AND alert_id = {alert_id:String} GROUP BY channel",
            parameters={"tenant": tenant, "alert_id": alert_id},
        )
        return {
            channel: ChannelHistory(int(attempts), outcome, _utc(first))
            for channel, attempts, outcome, first in result.result_rows
        }

    async def record(self, attempt: Attempt) -> None:
        ch = await self._ch()
        await ch.insert("alert_deliveries", [attempt.row()], column_names=list(DELIVERY_COLUMNS))


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
