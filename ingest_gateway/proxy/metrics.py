"""Prometheus metrics of the proxy, on the gateway's registry (GatewayMetrics.registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.calls = Counter(
            "spendstream_proxy_calls", "Calls forwarded upstream, by provider and event status", ["provider", "status"],
            registry=registry,
        )  # fmt: skip
        self.refused = Counter(
            "spendstream_proxy_refused", "Calls the proxy answered itself (auth, bad input, budget), by HTTP status",
            ["provider", "status"], registry=registry,
        )  # fmt: skip
        self.denied = Counter(
            "spendstream_proxy_budget_denied", "Calls refused by a hard budget before forwarding", ["provider"],
            registry=registry,
        )  # fmt: skip
        self.upstream_failures = Counter(
            "spendstream_proxy_upstream_failures", "Upstream connection failures and timeouts", ["provider"],
            registry=registry,
        )  # fmt: skip
        self.published = Counter(
            "spendstream_proxy_events_published", "Usage events of proxied calls acknowledged by the broker",
            registry=registry,
        )  # fmt: skip
        self.spooled = Counter(
            "spendstream_proxy_events_spooled", "Usage events written to the local spool (broker unavailable)",
            registry=registry,
        )  # fmt: skip
        self.drained = Counter(
            "spendstream_proxy_events_drained", "Spooled usage events published later", registry=registry
        )
        self.dropped = Counter(
            "spendstream_proxy_events_dropped", "Usage events lost: the spool was full or unwritable",
            registry=registry,
        )  # fmt: skip
        self.invalid_events = Counter(
            "spendstream_proxy_events_invalid", "Proxied calls whose event failed validation (a bug)",
            registry=registry,
        )  # fmt: skip
