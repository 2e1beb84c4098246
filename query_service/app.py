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

from kessai.edge import create_api, served
from kessai.errors import error_response
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
    """The app as ``kessai query-api`` serves it (``kessai.edge.served``)."""
    return served(create_app)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
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
        redis = _summary_redis(settings.redis_url)

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
        try:
            yield
        finally:
            if redis is not None:
                await redis.aclose()
            engine.dispose()

    app = create_api(
        service="query",
        title="kessai query API",
        description="Reads of the kessai payment ledger for the merchant dashboard: payments, "
        "a user's history, totals by day and hour, CSV exports. Served from the read "
        "database only; every answer says how fresh it is (`as_of`, `lag_seconds`). "
        "Amounts are integers in minor units.",
        settings=settings,
        registry=registry,
        router=router,
        lifespan=lifespan,
        keys_engine=lambda url: create_read_only_engine(url, pool_size=2),
    )

    app.add_exception_handler(sa.exc.OperationalError, _read_db_unavailable)
    return app


def _summary_redis(url: str | None) -> Redis | None:
    """The summary cache's Redis client, or ``None`` without ``KESSAI_REDIS_URL``."""
    if not url:
        return None
    return Redis.from_pool(
        BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
    )


async def _read_db_unavailable(_request: Request, exc: Exception) -> Response:
    log.warning("read database unavailable: %s", getattr(exc, "orig", exc))
    return error_response(
        503,
        "read_db_unavailable",
        "The read database is unavailable; retry later.",
        headers={"Retry-After": "1"},
    )
