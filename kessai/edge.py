"""What every kessai API shares, in one place so both APIs stay alike: the middleware they run
behind (``install_edge``) and the rest of their app factory (``create_api``, ``served``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from kessai.auth import Authenticator, RequireApiKey
from kessai.errors import install_error_handlers
from kessai.http import BodySizeLimit, JSONResponse, SecurityHeaders
from kessai.observability import HttpMetrics
from kessai.openapi import install_openapi
from kessai.overload import LoadShedder, Preference, RecentDevices, ShedLoad, reserved_slots
from kessai.ratelimit import RateLimitByIp, RateLimitByKey, RateLimiter
from kessai.runtime import freeze_startup_heap
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


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_api(
    *,
    service: str,
    title: str,
    description: str,
    settings: Settings,
    registry: CollectorRegistry,
    router: APIRouter,
    lifespan: Lifespan,
    keys_engine: Callable[[str], Engine],
) -> FastAPI:
    """A kessai API: ``router`` behind the edge (``install_edge``), errors in the error format,
    JSON by orjson, metrics in ``registry`` (on ``app.state.metrics_registry``).

    ``lifespan`` opens and closes the service's own resources; around it, the API key check's
    store is opened with ``keys_engine`` (``app.state.authenticator``) once they are open, and
    closed first. Outside development, a missing key store refuses to start here, before any
    resource is opened."""
    keys_db_url = settings.resolved_keys_db_url()

    @asynccontextmanager
    async def with_keys(app: FastAPI) -> AsyncIterator[None]:
        app.state.metrics_registry = registry
        async with lifespan(app):
            engine = keys_engine(keys_db_url)
            app.state.authenticator = Authenticator(
                engine, cache_seconds=settings.auth_cache_seconds
            )
            try:
                yield
            finally:
                app.state.authenticator = None
                engine.dispose()

    app = FastAPI(
        title=title,
        version="1",
        description=description,
        lifespan=with_keys,
        default_response_class=JSONResponse,
    )
    install_error_handlers(app)
    app.include_router(router)
    install_edge(app, settings, registry, service)
    return app


def served(create_app: Callable[[], FastAPI]) -> FastAPI:
    """The app as ``kessai command-api`` / ``query-api`` serve it (each uvicorn worker calls
    this): ``create_app()``, then the start-up heap frozen (``freeze_startup_heap``)."""
    app = create_app()
    freeze_startup_heap()
    return app
