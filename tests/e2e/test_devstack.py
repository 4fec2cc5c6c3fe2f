"""The dev stack supervisor (spendstream/devstack.py) with real processes: start, supervise, and the
embedded broker's restart, after which usage.raw offsets start again at 0.

One stack for the module (start-up costs ≈ 15 s); the tests run in file order and each leaves the
stack healthy for the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendstream.clickhouse import get_client
from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings
from spendstream.simulate import Fleet, run
from stream_processors.stages import STAGES

pytestmark = [pytest.mark.e2e, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.timeout(300)]

EVENTS_PER_ROUND = 3_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("devstack")
    # a short sink window keeps the waits below short; nothing here depends on its value
    settings = local_settings(data_dir, sink={"batch_seconds": 0.2})
    components = (*INFRASTRUCTURE, "gateway", *STAGES)
    assert {"pricing", "sink"} <= set(components), "the pipeline under test needs pricing and sink"
    with Stack(settings, data_dir, components) as running:
        yield running


def send(stack: Stack, events: int, seed: int) -> int:
    counters = asyncio.run(
        run(
            stack.gateway_url,
            [stack.settings.bootstrap_admin_key.get_secret_value()],
            rate=0,
            duration=0,
            events=events,
            batch=250,
            fleet=Fleet(seed=seed),
            progress=False,
        )
    )
    assert counters.failed_requests == 0 and counters.rejected == 0
    return counters.accepted


def stored_rows(stack: Stack) -> int:
    client = get_client(stack.settings)
    try:
        return int(client.command("SELECT count() FROM usage_events"))
    finally:
        client.close()


def wait_for_rows(stack: Stack, expected: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (rows := stored_rows(stack)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows


def test_events_land_in_clickhouse(stack: Stack) -> None:
    accepted = send(stack, EVENTS_PER_ROUND, seed=1)
    assert accepted == EVENTS_PER_ROUND
    assert wait_for_rows(stack, accepted) == accepted


def test_supervisor_restarts_a_killed_component(stack: Stack) -> None:
    before = stack.restarts("sink")
    stack.kill("sink")
    stack.wait_healthy(("sink",), timeout=90)
    assert stack.restarts("sink") == before + 1
    assert any(name == "sink" and what == "restarted" for _, name, what in stack.history)
    total = stored_rows(stack) + send(stack, 500, seed=2)
    assert wait_for_rows(stack, total) == total


def test_new_events_land_after_the_broker_restarts(stack: Stack) -> None:
    """The restarted broker's log starts at offset 0, below ClickHouse's ingest_progress watermark:
    without the supervisor's reset the sink would drop the new events as replays."""
    client = get_client(stack.settings)
    try:
        old_watermarks = dict(
            client.query(
                "SELECT src_partition, max(max_src_offset) FROM ingest_progress GROUP BY src_partition"
            ).result_rows
        )
        assert old_watermarks
        stored_before = stored_rows(stack)
        restarted_at = time.time()

        stack.kill("kafka")
        stack.wait_healthy(timeout=120)
        assert stack.restarts("kafka") == 1
        # once at start-up, once for the new broker
        assert sum("ingest_progress truncated" in what for _, _, what in stack.history) == 2

        accepted = send(stack, EVENTS_PER_ROUND, seed=3)
        assert wait_for_rows(stack, stored_before + accepted) == stored_before + accepted
        new_rows = client.query(
            "SELECT src_partition, src_offset FROM usage_events WHERE received_at >= fromUnixTimestamp64Milli({t:Int64})",
            parameters={"t": int(restarted_at * 1000)},
        ).result_rows
    finally:
        client.close()
    assert len(new_rows) == accepted
    # the case the reset exists for: new records numbered at or below the old log's watermark
    assert any(offset <= old_watermarks.get(partition, -1) for partition, offset in new_rows)
