"""The ``spendstream collectors`` service: APScheduler 3.x (a BlockingScheduler, UTC cron
triggers) runs one job per provider of the registry on its schedule (defaults: OpenAI every 6 h at
:10, Anthropic hourly at :05; settings ``collectors.<provider>_schedule``). A job collects every
live connection of its provider, both datasets, one after the other, then judges the connection's
settled days for the ``reconciliation`` alert (spendstream/collectors/alerts.py).

Why APScheduler and not the stream runtime: collection is a clock-driven batch against HTTP APIs,
not a stream; APScheduler's cron triggers, ``max_instances=1`` (a job never overlaps itself) and
``coalesce`` (missed fire times run once) are exactly the rules. Runs of one connection also never
overlap with a backfill or a manual run in the same process (runner's per-connection lock).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from datetime import UTC
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from spendstream.clickhouse import get_client
from spendstream.collectors import runner
from spendstream.collectors.alerts import raise_drift_alerts
from spendstream.collectors.connections import load_open_connections
from spendstream.collectors.registry import PROVIDERS
from spendstream.secrets import Keyring

log = logging.getLogger(__name__)


def keyring_of(settings: Any) -> Keyring:
    return Keyring.parse(settings.secret_keys.get_secret_value())


def run_provider(settings: Any, provider: str, trigger: str = "schedule", **options: Any) -> list[dict[str, Any]]:
    """One job: every live connection of ``provider``, both datasets. Returns the run records."""
    client = get_client(settings)
    try:
        connections, failed = load_open_connections(client, keyring_of(settings), provider=provider)
        if failed:
            log.error("collectors: %d %s connection(s) could not be opened (secret key missing?)", failed, provider)
        collect_options = runner.options_from_settings(settings, **options)
        runs = []
        for conn in connections:
            mine = [
                runner.collect(client, conn, d, collect_options, trigger=trigger) for d in PROVIDERS[provider].datasets
            ]
            runs += mine
            if any(r["dataset"] == "costs" and r["status"] == "ok" for r in mine):
                try:
                    raise_drift_alerts(client, settings, conn)
                except Exception:  # Kafka or ClickHouse away: nothing recorded, the next run judges again
                    log.exception("collectors: reconciliation alerts of %s not sent this run", conn.id)
        log.info("collectors: %s job done, %d run(s), %d failed", provider, len(runs),
                 sum(r["status"] == "error" for r in runs))  # fmt: skip
        return runs
    finally:
        client.close()


def schedule(settings: Any, scheduler: BaseScheduler, job: Callable[..., Any] = run_provider) -> BaseScheduler:
    for provider in PROVIDERS:
        crontab = getattr(settings.collectors, f"{provider}_schedule")
        scheduler.add_job(
            job,
            CronTrigger.from_crontab(crontab, timezone=UTC),
            args=(settings, provider),
            id=f"collect-{provider}",
            name=f"collect {provider} usage and costs",
            max_instances=1,  # never overlapping itself
            coalesce=True,  # missed fire times (a long run, a pause) run once
            misfire_grace_time=3600,
            replace_existing=True,
        )
    return scheduler


def run_service(settings: Any) -> None:
    """Block, running the schedule, until SIGTERM/SIGINT."""
    keyring_of(settings)  # refuse to start without a usable SPENDSTREAM_SECRET_KEYS
    scheduler = schedule(settings, BlockingScheduler(timezone=UTC))

    def stop(signum: int, _frame: Any) -> None:
        log.info("collectors: signal %d, stopping", signum)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for job in scheduler.get_jobs():
        log.info("collectors: %s on %s", job.name, job.trigger)
    scheduler.start()
