"""Prometheus metrics of the gateway.

Each app gets its own registry so several apps (tests, the benchmark) can live in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_accepted = Counter(
            "spendstream_gateway_events_accepted",
            "Events published to usage.raw and acknowledged by the broker",
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "spendstream_gateway_events_rejected",
            "Events not accepted, by reason: the first field named, or broker_unavailable / saturated",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "spendstream_gateway_requests",
            "POST /v1/events requests by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self._request_counts: dict[int, Any] = {}
        self.request_latency = Histogram(
            "spendstream_gateway_request_seconds",
            "POST /v1/events latency, from the first body byte to the response",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.publish_latency = Histogram(
            "spendstream_gateway_publish_seconds",
            "Time from handing a request's records to the producer until every one was acknowledged",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.in_flight_events = Gauge(
            "spendstream_gateway_in_flight_events",
            "Events handed to the producer and not yet acknowledged (read at scrape time)",
            registry=self.registry,
        )
        self.keys_loaded = Gauge(
            "spendstream_gateway_api_keys_loaded",
            "API keys in the gateway's cache",
            registry=self.registry,
        )
        self.key_refresh_failures = Counter(
            "spendstream_gateway_api_key_refresh_failures",
            "Failed reloads of API keys from ClickHouse (the last good set keeps serving)",
            registry=self.registry,
        )

        self.otlp_requests = Counter(
            "spendstream_gateway_otlp_requests",
            "POST /otlp/v1/traces requests by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.otlp_spans = Counter(
            "spendstream_gateway_otlp_spans",
            "OTLP spans by outcome: received, not_model_call (no cost), event (published), rejected",
            ["outcome"],
            registry=self.registry,
        )

    def request_count(self, status: int) -> Any:
        """The requests counter of one status (label lookups cost more than the increment)."""
        child = self._request_counts.get(status)
        if child is None:
            child = self._request_counts[status] = self.requests.labels(status)
        return child
