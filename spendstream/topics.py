"""Every Kafka topic, declared once.

Value formats (orjson, see spendstream/contracts.py for the exact fields):
- usage.raw / usage.priced: an *envelope* per record holding the events of ONE key
  (``tenant/project``), so per-message overhead is paid per request/batch, not per event.
- usage.dlq: one record per unparseable input record, with the reason.
- budget.deltas: usage.priced repartitioned by budget id (internal to the budgets stage).
- budget.state: compacted current spend per (budget, window).
- budget.alerts: one record per alert, key = alert_id.

Budget configuration is not a topic: it lives in ClickHouse ``budgets``, which its readers poll.
Every topic gets ``kafka.partitions`` partitions, so the topics keyed by tenant/project stay
co-partitioned.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from spendstream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False


USAGE_RAW = TopicSpec("spendstream.usage.raw")
USAGE_PRICED = TopicSpec("spendstream.usage.priced")
USAGE_DLQ = TopicSpec("spendstream.usage.dlq")
BUDGET_DELTAS = TopicSpec("spendstream.budget.deltas")
BUDGET_STATE = TopicSpec("spendstream.budget.state", compacted=True)
BUDGET_ALERTS = TopicSpec("spendstream.budget.alerts")

ALL_TOPICS: tuple[TopicSpec, ...] = (
    USAGE_RAW,
    USAGE_PRICED,
    USAGE_DLQ,
    BUDGET_DELTAS,
    BUDGET_STATE,
    BUDGET_ALERTS,
)


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    return {"cleanup.policy": "compact"} if spec.compacted else {}


async def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = ALL_TOPICS) -> list[str]:
    """Create missing topics; return the names created. Safe to call from several processes."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from spendstream.kafka import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        for spec in missing:
            topic = NewTopic(
                name=spec.name,
                num_partitions=settings.kafka.partitions,
                replication_factor=settings.kafka.replication_factor,
                topic_configs=topic_configs(spec),
            )
            try:
                await admin.create_topics([topic])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        await admin.close()


def ensure_topics_sync(settings: Settings) -> list[str]:
    return asyncio.run(ensure_topics(settings))
