"""The command API application: ``create_app(settings)`` builds it; resources live in lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from command_service.metrics import OutboxCollector
from command_service.routes import router
from kessai.db import create_db_engine
from kessai.errors import install_error_handlers
from kessai.http import BodySizeLimit, JSONResponse
from kessai.observability import HttpMetrics
from kessai.settings import Settings

DB_POOL_SIZE = 16


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.resolved_write_db_url(), pool_size=DB_POOL_SIZE)
        collector = OutboxCollector(engine)
        registry.register(collector)
        app.state.settings = settings
        app.state.write_engine = engine
        app.state.in_flight = set()
        # At most as many handlers in threads as the pool has connections (pool + overflow).
        app.state.db_limiter = anyio.CapacityLimiter(DB_POOL_SIZE * 2)
        app.state.metrics_registry = registry
        try:
            yield
        finally:
            registry.unregister(collector)
            engine.dispose()

    app = FastAPI(
        title="kessai command API",
        version="1",
        description="Writes of the kessai payment ledger: payments and refunds. "
        "Every write needs an Idempotency-Key. Amounts are integers in minor units.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(HttpMetrics, registry=registry, service="command")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
