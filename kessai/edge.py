"""The middleware every kessai API runs behind, in one place so both APIs stay alike."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from kessai.auth import RequireApiKey
from kessai.http import BodySizeLimit, SecurityHeaders
from kessai.observability import HttpMetrics
from kessai.openapi import install_openapi
from kessai.overload import LoadShedder, Preference, RecentDevices, ShedLoad, reserved_slots
from kessai.ratelimit import RateLimitByIp, RateLimitByKey, RateLimiter
from kessai.settings import Settings


def install_edge(
    app: FastAPI, settings: Settings, registry: CollectorRegistry, service: str
) -> RateLimiter:
    """From the outside in: security headers and the header size limit, the body size limit,
    HTTP metrics, the load shedder, the per-IP rate limit, the API key, the per-key rate limit,
    then the routes. The key check reads ``app.state.authenticator`` (set by the app's
    lifespan). Returns the rate limiter (also on ``app.state.rate_limiter``) for routes with
    limits of their own; the load shedder is on ``app.state.load_shedder``."""
    rate_limiter = RateLimiter.for_service(settings, registry, service)
    app.state.rate_limiter = rate_limiter
    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(RateLimitByKey, limiter=rate_limiter)
    app.add_middleware(
        RequireApiKey, authenticator=lambda: getattr(app.state, "authenticator", None)
    )
    app.add_middleware(RateLimitByIp, limiter=rate_limiter)
    # Before the rate limits (their counters may be in Redis) and the key check: a refusal
    # costs no lookup. Inside the metrics, so refusals are counted and timed like the rest.
    shedder = LoadShedder(
        max_in_flight=settings.overload_max_in_flight,
        reserved=reserved_slots(
            settings.overload_max_in_flight, settings.overload_reserved_percent
        ),
        max_queue_wait=settings.overload_max_queue_wait_ms / 1000,
        registry=registry,
        service=service,
        # Refunds and device ids exist on the command API only.
        preference=Preference(
            RecentDevices(settings.overload_recent_devices, settings.overload_recent_device_seconds)
        )
        if service == "command"
        else None,
    )
    app.state.load_shedder = shedder
    app.add_middleware(ShedLoad, shedder=shedder)
    app.add_middleware(HttpMetrics, registry=registry, service=service)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders, max_header_bytes=settings.max_header_bytes)
    install_openapi(app)  # documents what the edge may answer on every route
    return rate_limiter
