"""API keys in ClickHouse and the gateway's key cache, including a ClickHouse outage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from gateway_support import (  # tests/integration is on sys.path
    events_by_id,
    gateway,
    raw_position,
    read_raw,
    wait_until,
)
from query_api_stack import migrate

from spendstream.clickhouse import get_client
from spendstream.keys import create_key, list_keys, load_live_keys, revoke_key
from spendstream.ports import free_port

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]

EVENT = {"project": "p", "model": "openai/gpt-4o", "input_tokens": 3, "output_tokens": 1}


@pytest.fixture(scope="module")
def migrated(make_settings):
    settings = make_settings(gateway={"key_cache_refresh_s": 0.2})
    migrate(settings)
    return settings


@pytest.fixture
def ch(migrated):
    client = get_client(migrated)
    yield client
    client.close()


def test_key_lifecycle_stores_only_a_hash(ch, unique_name):
    tenant = unique_name("t")
    key_id, key = create_key(ch, tenant, "read, ingest", "ci")
    assert re.fullmatch(rf"ss_{key_id}_[A-Za-z0-9_-]{{40,}}", key)
    rows = ch.query("SELECT * FROM api_keys WHERE id = {id:String}", parameters={"id": key_id}).named_results()
    (row,) = list(rows)
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["prefix"] == f"ss_{key_id}" and row["scopes"] == ["ingest", "read"]
    secret = key.split("_", 2)[2]
    assert all(secret not in str(value) for value in row.values())

    listed = list_keys(ch, tenant)
    assert [(k["id"], k["scopes"], k["name"]) for k in listed] == [(key_id, ["ingest", "read"], "ci")]
    assert "key_hash" not in listed[0]

    assert revoke_key(ch, key_id, tenant="someone-else") is False
    assert revoke_key(ch, key_id) is True
    assert revoke_key(ch, key_id) is False
    assert list_keys(ch, tenant) == []
    assert list_keys(ch, tenant, include_revoked=True)[0]["revoked_at"] is not None
    assert key_id not in {k.principal.key_id for k in load_live_keys(ch)}


async def test_gateway_takes_tenant_and_scopes_from_clickhouse_keys(migrated, ch, unique_name):
    tenant = unique_name("t")
    _, ingest_key = create_key(ch, tenant, ["ingest"], "writer")
    _, read_key = create_key(ch, tenant, ["read"], "reader")
    async with gateway(migrated) as client:
        since = await raw_position(migrated)
        assert (await client.get("/readyz")).status_code == 200
        ok = await client.post("/v1/events", json={**EVENT, "event_id": "k-1"}, headers=auth(ingest_key))
        assert ok.status_code == 202, ok.text
        forbidden = await client.post("/v1/events", json=EVENT, headers=auth(read_key))
        assert forbidden.status_code == 403 and "ingest" in forbidden.json()["message"]
        smuggled = await client.post("/v1/events", json={**EVENT, "tenant": "other"}, headers=auth(ingest_key))
        assert smuggled.status_code == 400 and smuggled.json()["rejected"][0]["errors"][0]["field"] == "tenant"

        # a key made after start-up works at once (an unknown id triggers a reload)
        _, fresh_key = create_key(ch, tenant, ["ingest"], "fresh")
        fresh = await client.post("/v1/events", json={**EVENT, "event_id": "k-2"}, headers=auth(fresh_key))
        assert fresh.status_code == 202, fresh.text

        revoke_key(ch, fresh_key.split("_")[1])

        async def revoked() -> bool:
            answer = await client.post("/v1/events", json=EVENT, headers=auth(fresh_key))
            return answer.status_code == 401

        await wait_until(revoked, timeout=10)
    records = await read_raw(migrated, tenant, 2, since)
    assert {key for key, _ in records} == {f"{tenant}/p".encode()}
    assert {"k-1", "k-2"} <= set(events_by_id(records))


class TcpProxy:
    """Forwards a local port to ClickHouse; ``stop()`` is a ClickHouse outage as the gateway sees it."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones (no wait_closed: a keep-alive client could
        hold it open)."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if writer.transport.is_closing():  # stopped while connecting upstream
            up_writer.transport.abort()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_ingest_continues_for_known_keys_while_clickhouse_is_down(migrated, ch, unique_name, make_settings):
    tenant = unique_name("t")
    _, key = create_key(ch, tenant, ["ingest"], "writer")
    target = urlsplit(migrated.clickhouse_url)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    settings = migrated.model_copy(
        update={"clickhouse": migrated.clickhouse.model_copy(update={"url": f"http://127.0.0.1:{proxy.port}"})}
    )
    async with gateway(settings) as client:
        since = await raw_position(migrated)
        assert (await client.post("/v1/events", json=EVENT, headers=auth(key))).status_code == 202
        await proxy.stop()

        async def reload_failed() -> bool:
            metrics = (await client.get("/metrics")).text
            return re.search(r"^spendstream_gateway_api_key_refresh_failures_total [1-9]", metrics, re.M) is not None

        await wait_until(reload_failed, timeout=15)
        during = await client.post("/v1/events", json={**EVENT, "event_id": "during-outage"}, headers=auth(key))
        assert during.status_code == 202, during.text
        unknown = await client.post("/v1/events", json=EVENT, headers=auth(f"ss_{'0' * 16}_{'x' * 43}"))
        assert unknown.status_code == 401
        assert (await client.get("/readyz")).json()["api_keys_loaded"] is True  # the last good set serves
    assert "during-outage" in events_by_id(await read_raw(migrated, tenant, 2, since))


async def test_cli_creates_a_key_the_gateway_accepts(migrated, unique_name):
    tenant = unique_name("t")
    env = {
        **os.environ,
        "SPENDSTREAM_CLICKHOUSE__URL": migrated.clickhouse_url,
        "SPENDSTREAM_CLICKHOUSE__DATABASE": migrated.clickhouse.database,
    }
    cli = [sys.executable, "-m", "spendstream.cli", "keys", "create", "--tenant", tenant]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=60)

    made = await asyncio.to_thread(run, "--scopes", "ingest,read", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert set(created) == {"id", "key", "tenant", "scopes"}
    assert created["tenant"] == tenant and created["scopes"] == ["ingest", "read"]
    assert created["key"].startswith(f"ss_{created['id']}_")

    plain = await asyncio.to_thread(run, "--name", "ops")
    assert plain.returncode == 0, plain.stderr
    printed = re.findall(r"^ss_[0-9a-f]{16}_\S+$", plain.stdout, re.M)
    assert len(printed) == 1 and "not shown again" in plain.stdout

    bad = await asyncio.to_thread(run, "--scopes", "ingest,root")
    assert bad.returncode == 2 and "scopes" in bad.stderr

    env["SPENDSTREAM_CLICKHOUSE__DATABASE"] = unique_name("never_migrated")
    unmigrated = await asyncio.to_thread(run, "--scopes", "ingest")
    assert unmigrated.returncode == 1 and "spendstream migrate" in unmigrated.stderr
    env["SPENDSTREAM_CLICKHOUSE__DATABASE"] = migrated.clickhouse.database

    async with gateway(migrated) as client:
        answer = await client.post("/v1/events", json=EVENT, headers=auth(created["key"]))
    assert answer.status_code == 202, answer.text


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
