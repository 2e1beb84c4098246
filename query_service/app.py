"""The query API application: ``create_app(settings)`` builds it; resources live in lifespan.

It reads the read database only, through a read-only engine (``query_service.engine``) on
``KESSAI_QUERY_DB_URL`` (else ``KESSAI_READ_DB_URL``), kept on ``app.state.read_engine``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.responses import Response

from kessai.auth import Authenticator
from kessai.edge import install_edge
from kessai.errors import error_response, install_error_handlers
from kessai.http import JSONResponse
from kessai.runtime import freeze_startup_heap
from kessai.settings import Settings
from query_service import handlers
from query_service.cache import FreshnessCache, SummaryCache, ZoneCache
from query_service.engine import create_read_only_engine
from query_service.routes import Resources, router

log = logging.getLogger(__name__)

DB_POOL_SIZE = 16
REDIS_TIMEOUT_SECONDS = 0.25
"""A cache that answers slower than this is slower than the database it saves: give up on it."""
REDIS_MAX_CONNECTIONS = 32
"""Bounded, so a burst of requests queues for a Redis connection instead of opening thousands."""


def create_served_app() -> FastAPI:
    """The app as ``kessai query-api`` serves it (each uvicorn worker calls this): ``create_app``,
    then the start-up heap frozen (``kessai.runtime.freeze_startup_heap``)."""
    app = create_app()
    freeze_startup_heap()
    return app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keys_db_url = settings.resolved_keys_db_url()  # outside development: refuse to start
    registry = CollectorRegistry()
    summary_cache_lookups = Counter(
        "kessai_query_summary_cache_total",
        "Lookups of the summary cache by result (hit, miss, redis_error).",
        ["result"],
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_read_only_engine(settings.resolved_query_db_url(), pool_size=DB_POOL_SIZE)
        # At most as many reads in threads as the pool keeps connections: overflow connections
        # are opened and closed per checkout (see command_service/app.py).
        limiter = anyio.CapacityLimiter(DB_POOL_SIZE)
        redis = (
            Redis.from_pool(
                BlockingConnectionPool.from_url(
                    settings.redis_url,
                    max_connections=REDIS_MAX_CONNECTIONS,
                    timeout=REDIS_TIMEOUT_SECONDS,
                    socket_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                )
            )
            if settings.redis_url
            else None
        )

        async def load_zone(merchant_id: str) -> str | None:
            return await anyio.to_thread.run_sync(
                lambda: handlers.merchant_time_zone(engine=engine, merchant_id=merchant_id),
                limiter=limiter,
            )

        async def load_as_of() -> datetime | None:
            return await anyio.to_thread.run_sync(
                lambda: handlers.read_as_of(engine=engine, topic=settings.topic),
                limiter=limiter,
            )

        app.state.settings = settings
        app.state.read_engine = engine
        app.state.metrics_registry = registry
        app.state.resources = Resources(
            settings=settings,
            engine=engine,
            limiter=limiter,
            zones=ZoneCache(load_zone, default=settings.default_merchant_time_zone),
            freshness=FreshnessCache(load_as_of),
            summaries=SummaryCache(
                ttl=settings.summary_cache_seconds,
                redis=redis,
                on_lookup=lambda result: summary_cache_lookups.labels(result).inc(),
            ),
        )
        keys_engine = create_read_only_engine(keys_db_url, pool_size=2)
        app.state.authenticator = Authenticator(
            keys_engine, cache_seconds=settings.auth_cache_seconds
        )
        try:
            yield
        finally:
            app.state.authenticator = None
            if redis is not None:
                await redis.aclose()
            engine.dispose()
            keys_engine.dispose()

    app = FastAPI(
        title="kessai query API",
        version="1",
        description="Reads of the kessai payment ledger for the merchant dashboard: payments, "
        "a user's history, totals by day and hour, CSV exports. Served from the read "
        "database only; every answer says how fresh it is (`as_of`, `lag_seconds`). "
        "Amounts are integers in minor units.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    install_error_handlers(app)

    @app.exception_handler(sa.exc.OperationalError)
    async def _read_db_unavailable(_request: Request, exc: sa.exc.OperationalError) -> Response:
        log.warning("read database unavailable: %s", exc.orig)
        return error_response(
            503,
            "read_db_unavailable",
            "The read database is unavailable; retry later.",
            headers={"Retry-After": "1"},
        )

    app.include_router(router)
    install_edge(app, settings, registry, "query")
    return app
