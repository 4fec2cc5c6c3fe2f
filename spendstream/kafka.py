"""Kafka client settings, including the one place where the embedded broker profile lives.

The embedded broker (Tansu 0.6) differs from real Kafka in ways measured in
shared/EMBEDDED-STACK.md. Every workaround is applied here and only when
``settings.kafka.profile == "embedded"``; production clients never see them.
"""

from __future__ import annotations

from typing import Any

from spendstream.settings import Settings

#: Tansu workarounds. Why each one:
#: - group joins wait ~half the session timeout -> short session/heartbeat;
#: - ListOffsets(LATEST) is wrong when a batch holds >1 record -> Faust's producer must send one
#:   record per batch or table recovery loses updates (producer_max_batch_size=64);
#: - no InitProducerId -> no idempotent producer, no exactly_once;
#: - a fetch is answered when fetch_max_wait_ms has passed even if records arrived meanwhile
#:   (measured per consumer hop: median 0.48 s, max 1.24 s at Faust's fixed 1500 ms; 0.02 s / 0.05 s
#:   at 100 ms) -> short fetch waits, for Faust too (see apply_faust_embedded_profile); the price
#:   is about 10 empty fetches a second per idle consumer.
EMBEDDED_FETCH_MAX_WAIT_MS = 100
EMBEDDED_CONSUMER = {
    "session_timeout_ms": 2_000,
    "heartbeat_interval_ms": 500,
    "rebalance_timeout_ms": 2_000,
    "fetch_max_wait_ms": EMBEDDED_FETCH_MAX_WAIT_MS,
}
EMBEDDED_FAUST = {
    "broker_session_timeout": 2.0,
    "broker_heartbeat_interval": 0.5,
    "broker_rebalance_timeout": 2.0,
    "producer_max_batch_size": 64,
    "table_standby_replicas": 1,
    "processing_guarantee": "at_least_once",
}
PRODUCTION_FAUST = {
    "processing_guarantee": "at_least_once",
    "table_standby_replicas": 1,
}


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and admin clients."""
    k = settings.kafka
    kw: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap, "security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        kw.update(
            sasl_mechanism=k.sasl_mechanism,
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password.get_secret_value(),
        )
    return kw


def producer_kwargs(settings: Settings, **overrides: Any) -> dict[str, Any]:
    kw = client_kwargs(settings)
    kw.update(acks="all", linger_ms=2, max_batch_size=1_048_576, request_timeout_ms=30_000)
    if not settings.kafka.embedded:
        # Real Kafka: idempotent producer removes duplicates from producer retries.
        kw["enable_idempotence"] = True
    kw.update(overrides)
    return kw


def consumer_kwargs(settings: Settings, group_id: str | None, **overrides: Any) -> dict[str, Any]:
    kw = client_kwargs(settings)
    kw.update(group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest")
    if settings.kafka.embedded:
        kw.update(EMBEDDED_CONSUMER)
    kw.update(overrides)
    return kw


def faust_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App`` (broker part)."""
    broker = ",".join(f"kafka://{h}" for h in settings.kafka_bootstrap.split(","))
    kw: dict[str, Any] = {
        "broker": broker,
        "store": "memory://",
        "topic_partitions": settings.kafka.partitions,
        "topic_replication_factor": settings.kafka.replication_factor,
        "broker_commit_every": 1,
    }
    kw.update(EMBEDDED_FAUST if settings.kafka.embedded else PRODUCTION_FAUST)
    return kw


def apply_faust_embedded_profile(settings: Settings) -> None:
    """Faust's aiokafka driver fixes fetch_max_wait_ms at 1500 (no setting reaches it); against
    the embedded broker every worker consumer of this process gets EMBEDDED_FETCH_MAX_WAIT_MS."""
    if not settings.kafka.embedded:
        return
    from faust.transport.drivers import aiokafka as driver

    create = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "embedded_profile", False):
        return

    def create_with_short_fetch_wait(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = EMBEDDED_FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start()
        return consumer

    create_with_short_fetch_wait.embedded_profile = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = create_with_short_fetch_wait
