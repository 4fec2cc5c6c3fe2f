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
#: - no InitProducerId -> no idempotent producer, no exactly_once.
EMBEDDED_CONSUMER = {
    "session_timeout_ms": 2_000,
    "heartbeat_interval_ms": 500,
    "rebalance_timeout_ms": 2_000,
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
