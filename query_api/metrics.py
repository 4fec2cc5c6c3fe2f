"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "spendstream_query_api_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "spendstream_query_api_request_seconds",
            "time to the response head, by route",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.auth_events = Counter(
            "spendstream_query_api_auth_events_total",
            "people's logins, refreshes, logouts, invites and membership changes, by action and outcome "
            "(the audit_log rows, counted even when one is dropped)",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.sql_refused = Counter(
            "spendstream_query_api_sql_refused_total",
            "analyst SQL statements refused, by reason",
            ["reason"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streamed exports are not buffered."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                # the route template, never the raw path: ids in paths would explode cardinality
                name = getattr(route, "path", "unmatched")
                self.metrics.latency.labels(scope["method"], name).observe(time.perf_counter() - start)
                self.metrics.requests.labels(scope["method"], name, str(status)).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)
