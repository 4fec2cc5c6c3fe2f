"""A 1M-row export streams through the query API with flat memory (RSS of the server process,
which runs as `spendstream query-api` in its own process)."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest
from query_api_stack import migrate, rss_bytes, spawn_query_api  # pytest puts tests/integration on sys.path

from spendstream.clickhouse import get_client

pytestmark = pytest.mark.clickhouse

ROWS = 1_000_000
ADMIN_KEY = "ss_export_admin_" + "e" * 24
#: what the server may grow by while streaming 1M rows (it holds only chunks in flight)
RSS_BUDGET = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def server(make_settings, tmp_path_factory):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant="bulk")
    migrate(settings)
    client = get_client(settings)
    try:
        # generated inside ClickHouse: 1M events over 10 days, costs 1..1000 nano-USD
        client.command(
            f"""INSERT INTO usage_events (tenant, project, agent, user, provider, model, input_tokens, output_tokens,
                   cost_nanos, cost_input_nanos, pricing_status, status, event_id, timestamp)
            SELECT 'bulk', concat('p', toString(number % 7)), concat('agent-', toString(number % 50)),
                   concat('u', toString(number % 300)), 'openai', 'gpt-4o-mini', number % 4000, number % 900,
                   number % 1000 + 1, number % 1000 + 1, 'priced', 'ok', concat('ev-', toString(number)),
                   toDateTime64('2024-06-01 00:00:00', 3, 'UTC') + toIntervalMillisecond(number * 864)
            FROM numbers({ROWS})"""
        )
    finally:
        client.close()
    log = tmp_path_factory.mktemp("qa") / "query-api.log"
    proc = spawn_query_api(settings, str(log))
    try:
        yield f"http://127.0.0.1:{settings.query_api.port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=15)


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _stream(url: str, params: dict, sink) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.stream("GET", url + "/v1/analytics/export", params=params, headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_bytes():
            sink(chunk)
        return r.status_code, r.headers["content-disposition"]


def _warm(url: str) -> None:
    # first requests load the catalog, the key store and the ClickHouse pool; measure after them
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    params = {"from": "2024-06-01", "to": "2024-06-01T00:01:00Z", "format": "csv"}
    for _ in range(3):
        httpx.get(url + "/v1/analytics/export", params=params, headers=headers, timeout=60).raise_for_status()


def test_csv_export_of_a_million_rows_streams_in_bounded_memory(server):
    url, pid = server
    _warm(url)
    baseline = rss_bytes(pid)
    lines = 0
    tail = b""

    def count(chunk: bytes) -> None:
        nonlocal lines, tail
        data = tail + chunk
        rows = data.split(b"\n")
        tail = rows.pop()
        lines += len(rows)

    started = time.monotonic()
    with RssSampler(pid) as rss:
        _, disposition = _stream(url, {"from": "2024-06-01", "to": "2024-06-12", "format": "csv"}, count)
    elapsed = time.monotonic() - started
    assert lines == ROWS + 1  # header + one line per event
    # a date `to` includes that day
    assert 'filename="spendstream-events-20240601T000000Z-20240613T000000Z.csv"' in disposition
    growth = rss.peak - baseline
    print(
        f"\n1M-row CSV export: {elapsed:.1f} s, server RSS {baseline / 2**20:.0f} MiB -> peak {rss.peak / 2**20:.0f} MiB"
    )
    assert growth < RSS_BUDGET, f"server RSS grew by {growth / 2**20:.0f} MiB while streaming"


def test_parquet_export_of_a_million_rows_streams_in_bounded_memory(server, tmp_path):
    url, pid = server
    _warm(url)
    baseline = rss_bytes(pid)
    target = tmp_path / "events.parquet"
    with open(target, "wb") as out, RssSampler(pid) as rss:
        _stream(url, {"from": "2024-06-01", "to": "2024-06-12", "format": "parquet"}, out.write)
    meta = pq.ParquetFile(target).metadata
    assert meta.num_rows == ROWS and meta.num_row_groups > 1
    cost = pq.read_table(target, columns=["cost_nanos"]).column("cost_nanos")
    assert sum(cost.to_pylist()) == sum(n % 1000 + 1 for n in range(ROWS))
    growth = rss.peak - baseline
    print(
        f"\n1M-row Parquet export: {os.path.getsize(target) / 2**20:.0f} MiB, server RSS peak +{growth / 2**20:.0f} MiB"
    )
    assert growth < RSS_BUDGET, f"server RSS grew by {growth / 2**20:.0f} MiB while streaming"
