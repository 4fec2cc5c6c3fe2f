"""clickhouse-connect clients built from settings: the one place that knows how to connect.

``settings.clickhouse_url`` is an http(s) URL (a server, or the embedded chDB server started by
``spendstream dev``); a ``chdb:///abs/path`` URL selects clickhouse-connect's in-process chDB
backend (sync only, one path per process).
"""

from __future__ import annotations

import clickhouse_connect
from clickhouse_connect.driver.asyncclient import AsyncClient
from clickhouse_connect.driver.client import Client

from spendstream.settings import Settings


def _connect_args(settings: Settings, database: str | None) -> dict:
    args: dict = {"dsn": settings.clickhouse_url, "database": database or settings.clickhouse.database}
    if not settings.clickhouse_url.startswith("chdb:"):
        args |= {
            "username": settings.clickhouse.username,
            "password": settings.clickhouse.password.get_secret_value(),
            # A session serialises its queries server-side ("session is locked" under concurrency);
            # nothing here relies on session state (no SET, no temporary tables).
            "autogenerate_session_id": False,
        }
    return args


def get_client(settings: Settings, database: str | None = None) -> Client:
    return clickhouse_connect.get_client(**_connect_args(settings, database))


async def get_async_client(settings: Settings, database: str | None = None) -> AsyncClient:
    return await clickhouse_connect.get_async_client(**_connect_args(settings, database))
