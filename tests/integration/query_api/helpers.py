"""Helpers of the query API tests: settings, the app behind an HTTP client, statement
counting, and assertions on pages and errors."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.engine import Engine

from kessai.auth import ADMIN, USERS_READ, merchant_scope
from kessai.db import create_db_engine
from kessai.events import PaymentCaptured
from kessai.settings import DEFAULT_TOPIC, Settings
from query_service.app import create_app
from tests.helpers import UNBOUNDED_IN_FLIGHT, UNLIMITED, api_key, bearer

TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 24, 16, 30, tzinfo=UTC)
REDIS_URL = os.environ.get("KESSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def read_db_writer(url: str) -> Iterator[Engine]:
    """An engine that writes the read database (the query API never can), disposed after."""
    engine = create_db_engine(url, pool_size=2)
    yield engine
    engine.dispose()


def query_settings(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path,
        "read_db_url": url,
        "query_db_url": None,
        "redis_url": None,
        "topic": DEFAULT_TOPIC,
        "summary_cache_seconds": 2.0,
        "csv_max_rows": 1_000_000,
        "default_merchant_time_zone": "Asia/Tokyo",
        "rate_limit_per_ip": UNLIMITED,
        "rate_limit_reads": UNLIMITED,
        "rate_limit_expensive": UNLIMITED,
        "overload_max_in_flight": UNBOUNDED_IN_FLIGHT,
    }
    values.update(overrides)
    return Settings(**values)


TEST_MERCHANTS = (
    "shop-a", "shop-b", "shop-0", "shop-big", "shop-hot", "shop-ny", "shop-nobody", "x",
    *(f"m-{i:02d}" for i in range(40)),
)  # fmt: skip
"""The merchants these tests read; the test key reads all of them (and users, and admin)."""


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, merchants: Sequence[str] = TEST_MERCHANTS
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The query API in process (real app, real database) behind an HTTP client whose key
    reads ``merchants``, users' histories and the admin routes."""
    app = create_app(settings)
    key = api_key(settings, *(merchant_scope(m) for m in merchants), USERS_READ, ADMIN)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://query.test",
            headers=bearer(key),
        ) as client,
    ):
        yield app, client


class StatementLog:
    """Every SQL statement an engine sends, counted by a ``before_cursor_execute`` listener."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.engine = engine
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        self.statements.append((statement, params))

    def touching(self, table: str) -> list[str]:
        return [s for s, _ in self.statements if table in s]

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` in the project's error format with ``code``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, error
    assert error["message"]
    assert "Traceback" not in response.text
    return error


def ids_of(body: dict[str, Any]) -> list[str]:
    return [item["payment_id"] for item in body["items"]]


def newest_first(events: Sequence[PaymentCaptured]) -> list[str]:
    ordered = sorted(events, key=lambda e: (e.occurred_at, e.payment_id), reverse=True)
    return [str(e.payment_id) for e in ordered]


async def page_through(
    client: httpx.AsyncClient, path: str, *, limit: int, between: Any = None
) -> tuple[list[dict[str, Any]], int]:
    """Follow ``next_cursor`` to the end; returns every item and the number of pages.
    ``between(page_number)`` runs after each page (to change the data while paging)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        assert len(body["items"]) <= limit
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert len(body["items"]) == limit
        if between is not None:
            between(pages)


def sort_key(item: dict[str, Any]) -> tuple[datetime, uuid.UUID]:
    return datetime.fromisoformat(item["created_at"]), uuid.UUID(item["payment_id"])
