"""Prometheus metrics: the HTTP services' request counts and latencies by route, and the
metrics server of the processes that have no HTTP API (relay, projector, reconciler)."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kessai.settings import Settings

__all__ = ["CONTENT_TYPE_LATEST", "HttpMetrics", "metrics_response", "serve_metrics"]


class HttpMetrics:
    """Counts and times every request by method, route template and status.

    Route templates (``/v1/payments/{payment_id}/refunds``), never raw paths, so a client
    cannot blow up the number of series.
    """

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry, service: str) -> None:
        self.app = app
        self.requests = Counter(
            "kessai_http_requests_total",
            "HTTP requests by route and status.",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "kessai_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["service", "method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.service = service

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
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.requests.labels(self.service, method, template, str(status)).inc()
            self.latency.labels(self.service, method, template).observe(time.perf_counter() - start)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve_metrics(settings: Settings, port: int, registry: CollectorRegistry) -> None:
    """Serve ``registry`` at ``/metrics`` on ``port`` of ``KESSAI_METRICS_HOST`` (a daemon
    thread, for the life of the process)."""
    start_http_server(port, addr=settings.metrics_host, registry=registry)
