"""The command API application: ``create_app(settings)`` builds it; resources live in lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge

from command_service.acquirer import Acquirer
from command_service.admission import Admission
from command_service.handlers import Recorder
from command_service.metrics import OutboxCollector
from command_service.routes import Resources, router
from kessai.db import create_db_engine
from kessai.edge import create_api, served
from kessai.settings import Settings

DB_POOL_SIZE = 16

log = logging.getLogger(__name__)


def create_served_app() -> FastAPI:
    """The app as ``kessai command-api`` serves it (``kessai.edge.served``)."""
    return served(create_app)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.resolved_write_db_url(), pool_size=DB_POOL_SIZE)
        collector = OutboxCollector(engine)
        registry.register(collector)
        # At most as many database calls in threads as the pool keeps connections: the pool's
        # overflow connections are opened and closed per checkout (a PyMySQL connect costs
        # ~23 ms of CPU here, most of it building a TLS context), so a bulkhead wider than the
        # pool churns connections under load (py-spy under bench.queries saw it).
        limiter = anyio.CapacityLimiter(DB_POOL_SIZE)
        # Admission settings are read in the background over a connection of their own (on
        # SQLite a write engine's connections would take the write lock just to read them).
        admission_engine = create_db_engine(
            settings.resolved_write_db_url(), pool_size=1, write=False
        )
        admission = Admission.from_settings(settings, admission_engine)
        await admission.reload()
        if admission.adaptive is not None:
            app.state.load_shedder.observers.append(admission.adaptive.observe)
        admitted_share = Gauge(
            "kessai_admission_admitted_percent",
            "Share of devices admission control admits now (100 when it is off; below the "
            "configured percent while the adaptive share is lowered).",
            registry=registry,
        )
        admitted_share.set_function(admission.admitted_percent)
        # One HTTP client for the card acquirer (pooled connections, breaker state).
        acquirer = await Acquirer.start(settings)
        if acquirer is None:
            log.warning(
                "KESSAI_ACQUIRER_URL is unset: card payments are refused "
                "(503 acquirer_unavailable); balance payments are not affected"
            )
        else:
            registry.register(acquirer.collector)
        # Group commit: concurrent payments and refunds share one write-store transaction.
        recorder = Recorder.start(settings, engine, limiter, registry)
        app.state.resources = Resources(
            settings=settings,
            engine=engine,
            limiter=limiter,
            recorder=recorder,
            admission=admission,
            acquirer=acquirer,
            registry=registry,
        )
        refresh = asyncio.create_task(admission.refresh_forever())
        try:
            yield
        finally:
            await recorder.aclose()
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
            registry.unregister(admitted_share)
            admission_engine.dispose()
            registry.unregister(collector)
            if acquirer is not None:
                registry.unregister(acquirer.collector)
                await acquirer.aclose()
            engine.dispose()

    return create_api(
        service="command",
        title="kessai command API",
        description="Writes of the kessai payment ledger: payments, refunds, top-ups and user "
        "registrations. "
        "Every write needs an Idempotency-Key. Amounts are integers in minor units.",
        settings=settings,
        registry=registry,
        router=router,
        lifespan=lifespan,
        keys_engine=lambda url: create_db_engine(url, pool_size=2, write=False),
    )
