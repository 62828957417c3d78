"""Prometheus metrics of one service, in a registry of its own (``GET /metrics``).

Names start with ``cpl_<service>_``: requests and latency per endpoint and requests in flight here; a service
adds its own metrics to :attr:`ServiceMetrics.registry` (the gateways' are in
:mod:`services.gateway.metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# No `*_created` series: they double the output and no dashboard here reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServiceMetrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = f"cpl_{service}"
        r = self.registry
        self.requests = Counter(f"{p}_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            f"{p}_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge(f"{p}_requests_in_flight", "requests being served", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure-ASGI middleware: counts requests and times them per endpoint (known paths only, no label explosion)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Callable[[], set[str]]) -> None:
        self.app = app
        self.metrics = metrics
        # Read on the first request: routes registered after the middleware count too.
        self._routes = routes
        self._endpoints: set[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._endpoints is None:
            self._endpoints = self._routes()
        path = scope.get("path", "")
        endpoint = path if path in self._endpoints else "other"
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if endpoint != "/metrics":
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
