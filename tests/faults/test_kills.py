"""SIGKILL components at random during a simulate run; nothing acknowledged is lost or counted twice.

Size: ``SPENDSTREAM_FAULTS_EVENTS`` events (CI default in faults_support; `make faults`: 1M) and
``SPENDSTREAM_FAULTS_KILLS`` kills (6 at CI size, 20 at full size), spread over the run, one at a
time, among ``SPENDSTREAM_FAULTS_TARGETS`` (comma-separated; every KILL_TARGETS by default): each
victim is restarted by the Stack's supervisor and healthy again before the next kill.
The schedule comes from ``SPENDSTREAM_FAULTS_SEED`` (random unless set; logged, so a failure can
be replayed with the same schedule and fleet).

Checked at the end, against what the gateway acknowledged (the simulate record):
- usage_events holds exactly the acknowledged event ids, once each, each at the cost the pricing
  core computes from the recorded event; per tenant count and sum(cost_nanos) equal;
- every aggregate table (MV target) has the same totals as usage_events;
- every (budget, window, threshold) the acknowledged spend crossed reached the local webhook
  receiver, each with one alert_id, and nothing else did (when the budgets and notify stages are
  in place).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path

import httpx
import pytest
from faults_support import (
    EVENTS,
    FULL_SIZE,
    KILLS,
    SEED,
    TARGETS,
    BudgetPlan,
    Receiver,
    Truth,
    alerts_in_place,
    check_alerts,
    check_clickhouse_against,
    create_alerting,
    estimate_cost_per_event,
    kill_schedule,
    locate_missing,
    run_kills,
    wait_stored,
    wait_until,
)

from spendstream.clickhouse import get_client
from spendstream.devstack import INFRASTRUCTURE, Stack, local_settings
from spendstream.keys import create_key
from spendstream.simulate import Fleet, run
from stream_processors.stages import STAGES

pytestmark = [
    pytest.mark.faults,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.timeout(7200 if FULL_SIZE else 900),
]

log = logging.getLogger("spendstream.faults")

#: what the issue names; the broker is paused, not killed (test_broker_pause.py)
KILL_TARGETS = ("gateway", "pricing", "budgets", "notify", "sink", "clickhouse")
#: a restart cycle (kill, restart, rebalance) takes seconds: leave each kill this much traffic
SECONDS_PER_KILL = 12.0
MAX_RATE = 3_000.0
MAIN_FLEET = {"projects": 5, "agents": 20, "users": 50, "runaway": True}
TRICKLE_RATE = 20.0


def test_sigkill_components_during_a_run_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    rate = min(MAX_RATE, EVENTS / (KILLS * SECONDS_PER_KILL))
    planned_s = EVENTS / rate
    settings = local_settings(tmp_path, log_level=os.environ.get("SPENDSTREAM_FAULTS_LOG_LEVEL", "WARNING"))
    components = (*INFRASTRUCTURE, "gateway", *STAGES, "query-api")
    targets = [name for name in KILL_TARGETS if name in components and (not TARGETS or name in TARGETS)]
    schedule = kill_schedule(rng, targets, KILLS, planned_s)
    log.warning(
        "fault run: seed %d (replay: SPENDSTREAM_FAULTS_SEED=%d), %d events at %.0f/s, components %s, kill schedule %s",
        SEED,
        SEED,
        EVENTS,
        rate,
        components,
        json.dumps(schedule),
    )
    (tmp_path / "kill-schedule.json").write_text(json.dumps({"seed": SEED, "schedule": schedule}))
    record = tmp_path / "acknowledged.ndjson"
    receiver = Receiver()
    try:
        with Stack(settings, tmp_path, components) as stack:
            keys = tenant_keys(stack)
            tenants = list(keys)
            plans = budget_plans(tenants, rate, planned_s) if alerts_in_place(stack) else []
            if plans:
                create_alerting(stack, keys, receiver, plans)
            else:
                log.warning("budgets/notify/query-api not all in the stack (%s): alerts are not checked", components)

            kills_done: list[tuple[float, str]] = []

            async def traffic() -> tuple:
                started = time.monotonic()
                with record.open("ab") as out:
                    # record's tenant_key is the index into the keys given: the same list for both
                    key_list = list(keys.values())
                    main = run(
                        stack.gateway_url,
                        key_list,
                        rate=rate,
                        duration=0,
                        events=EVENTS,
                        batch=100,
                        fleet=Fleet(**MAIN_FLEET, seed=SEED),
                        record=out,
                        progress=False,
                        retry_horizon_s=900.0,
                    )
                    trickle = run(
                        stack.gateway_url,
                        key_list,
                        rate=TRICKLE_RATE,
                        duration=0,
                        batch=1,
                        events=int(TRICKLE_RATE * planned_s),
                        fleet=Fleet(projects=2, agents=3, seed=SEED + 1),
                        record=out,
                        progress=False,
                        retry_horizon_s=900.0,
                    )
                    return await asyncio.gather(
                        main, trickle, asyncio.to_thread(run_kills, stack, schedule, started, kills_done)
                    )

            main_counters, trickle_counters, _ = asyncio.run(traffic())
            for counters in (main_counters, trickle_counters):
                assert counters.failed_requests == 0, f"requests given up after retrying: {counters}"
                assert counters.rejected == 0, counters
            assert [name for _, name in kills_done] == [name for _, name in schedule]
            for name in set(targets):
                assert stack.restarts(name) >= sum(1 for _, n in kills_done if n == name), stack.history
            # a process that died without being killed (e.g. a stage that exits while ClickHouse is
            # away) was restarted too; the run must still be exact, but say so
            unplanned = {
                name: stack.restarts(name) - sum(1 for _, n in kills_done if n == name) for name in stack.names
            }
            if any(unplanned.values()):
                log.warning(
                    "components that died without being killed (restarted): %s; see %s",
                    {n: c for n, c in unplanned.items() if c},
                    stack.log_dir,
                )

            truth = Truth.load(record, tenants)
            assert truth.duplicates_in_record == 0
            assert len(truth.events) == main_counters.accepted + trickle_counters.accepted
            # every check runs, so one failed run shows everything that went wrong
            failures: list[str] = []
            figures: dict = {}
            for check in (
                lambda: wait_stored(stack, len(truth.events), timeout=600 if FULL_SIZE else 180),
                lambda: figures.update(check_clickhouse_against(stack, truth)),
            ):
                try:
                    check()
                except AssertionError as exc:
                    failures.append(f"ClickHouse: {exc}")
            if plans:
                try:
                    figures["alerts"] = check_alerts(receiver, truth, plans)
                except AssertionError as exc:
                    failures.append(f"alerts: {exc}")
            if failures:
                try:
                    failures.append(locate_missing(stack, truth))
                except Exception as exc:  # noqa: BLE001 - a diagnosis, the failures above stand
                    failures.append(f"(locating the missing events failed: {exc!r})")
            assert not failures, f"seed {SEED}, kills {kills_done}:\n" + "\n".join(failures)
            log.warning("fault run passed: %s; kills %s", figures, kills_done)
    finally:
        receiver.close()


def tenant_keys(stack: Stack) -> dict[str, str]:
    """The bootstrap tenant's admin key and a second tenant's key (created in ClickHouse, as
    `spendstream keys create` does), once the gateway has loaded it."""
    client = get_client(stack.settings)
    try:
        _, second = create_key(client, "acme", "ingest,read,admin", name="faults")
    finally:
        client.close()

    def known() -> bool:
        resp = httpx.post(
            stack.gateway_url + "/v1/events",
            content=b"[]",
            headers={"Authorization": f"Bearer {second}", "Content-Type": "application/json"},
        )
        return resp.status_code not in (401, 403)

    wait_until("the gateway to load the new key", known, 30)
    return {stack.settings.bootstrap_tenant: stack.settings.bootstrap_admin_key.get_secret_value(), "acme": second}


def budget_plans(tenants: list[str], rate: float, seconds: float) -> list[BudgetPlan]:
    """Budgets sized from the fleet's mean cost so that, at the end of the run, spend stands at
    ~125 %, ~65 % and ~90 % of their limits: some thresholds crossed mid-run, some never."""
    per_event = estimate_cost_per_event(MAIN_FLEET, sample=10_000)
    per_tenant = per_event * rate * seconds / 2  # requests pick one of the two tenants at random
    first, second = tenants
    return [
        BudgetPlan(first, {}, "total", int(per_tenant / 1.25)),
        # agent 0 (the runaway, half the traffic) and every 5th other agent are project-0: ~60 %
        BudgetPlan(first, {"project": "project-0"}, "daily", int(per_tenant * 0.6 / 0.65)),
        BudgetPlan(second, {"agent": "runaway-agent"}, "total", int(per_tenant * 0.5 / 0.9)),
    ]
