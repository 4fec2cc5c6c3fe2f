"""The broker unavailable for 10 s during a simulate run: the gateway answers 503, never 202, while
it is gone; the run recovers and ClickHouse ends up with exactly the acknowledged events.

The embedded broker is paused (SIGSTOP, then SIGCONT), not stopped: it keeps its log only in
memory, so a real stop would lose every record and offset, which no broker outage does to a real
Kafka cluster. To the gateway and the stages a stopped process looks like an unreachable broker:
connections stay open, nothing is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from faults_support import SEED, Truth, check_clickhouse_against, wait_stored, wait_until

from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings
from spendstream.simulate import Fleet, run

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.timeout(600)]

log = logging.getLogger("spendstream.faults")

PAUSE_S = 10.0
#: the gateway's wait for acks; short, so that 503s come well inside the pause
SEND_TIMEOUT_S = 2.0
#: answers received this soon after SIGSTOP may carry acks the broker sent before it stopped
IN_FLIGHT_GRACE_S = 1.0
RATE = 400.0
EVENTS = 12_000


def test_gateway_answers_503_while_the_broker_is_away_and_the_run_recovers(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, log_level="WARNING", kafka={"send_timeout_s": SEND_TIMEOUT_S})
    components = (*INFRASTRUCTURE, "gateway", "pricing", "sink")
    record = tmp_path / "acknowledged.ndjson"
    answers: list[tuple[int, float]] = []
    window: dict[str, float] = {}

    with Stack(settings, tmp_path, components) as stack:
        key = settings.bootstrap_admin_key.get_secret_value()

        def outage() -> None:
            wait_until("traffic to flow", lambda: sum(1 for s, _ in answers if s == 202) >= 20, 60)
            stack.pause("kafka")
            window["paused"] = time.monotonic()
            log.warning("fault: broker paused (SIGSTOP) for %.0f s", PAUSE_S)
            time.sleep(PAUSE_S)  # the outage itself, not a readiness wait
            window["resumed"] = time.monotonic()
            stack.resume("kafka")

        async def traffic():
            with record.open("ab") as out:
                return await asyncio.gather(
                    run(
                        stack.gateway_url,
                        [key],
                        rate=RATE,
                        duration=0,
                        events=EVENTS,
                        batch=20,
                        fleet=Fleet(seed=SEED),
                        record=out,
                        progress=False,
                        retry_horizon_s=300.0,
                        on_answer=lambda status, at: answers.append((status, at)),
                    ),
                    asyncio.to_thread(outage),
                )

        counters, _ = asyncio.run(traffic())
        assert counters.failed_requests == 0 and counters.rejected == 0, counters

        during = [(s, t) for s, t in answers if window["paused"] + IN_FLIGHT_GRACE_S <= t <= window["resumed"]]
        after = [s for s, t in answers if t > window["resumed"]]
        assert during, "no answers during the outage: the test did not exercise it"
        assert all(s != 202 for s, _ in during), f"202 while the broker was paused: {during}"
        assert {s for s, _ in during} == {503}, (
            f"while the broker was away the gateway answered {sorted({s for s, _ in during})}"
        )
        assert 202 in after, "no 202 after the broker came back"

        truth = Truth.load(record, [settings.bootstrap_tenant])
        assert len(truth.events) == counters.accepted == EVENTS
        wait_stored(stack, len(truth.events), timeout=180)
        figures = check_clickhouse_against(stack, truth)
        log.warning("broker pause passed: %d answers during the pause, all 503; %s", len(during), figures)
