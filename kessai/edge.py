"""The middleware every kessai API runs behind, in one place so both APIs stay alike."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from kessai.auth import RequireApiKey
from kessai.http import BodySizeLimit, SecurityHeaders
from kessai.observability import HttpMetrics
from kessai.openapi import install_openapi
from kessai.ratelimit import RateLimitByIp, RateLimitByKey, RateLimiter
from kessai.settings import Settings


def install_edge(
    app: FastAPI, settings: Settings, registry: CollectorRegistry, service: str
) -> RateLimiter:
    """From the outside in: security headers and the header size limit, the body size limit,
    HTTP metrics, the per-IP rate limit, the API key, the per-key rate limit, then the routes.
    The key check reads ``app.state.authenticator`` (set by the app's lifespan). Returns the
    rate limiter (also on ``app.state.rate_limiter``) for routes with limits of their own."""
    rate_limiter = RateLimiter.for_service(settings, registry, service)
    app.state.rate_limiter = rate_limiter
    # add_middleware wraps what is there: the last added is the outermost.
    app.add_middleware(RateLimitByKey, limiter=rate_limiter)
    app.add_middleware(
        RequireApiKey, authenticator=lambda: getattr(app.state, "authenticator", None)
    )
    app.add_middleware(RateLimitByIp, limiter=rate_limiter)
    app.add_middleware(HttpMetrics, registry=registry, service=service)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders, max_header_bytes=settings.max_header_bytes)
    install_openapi(app)  # documents what the edge may answer on every route
    return rate_limiter
