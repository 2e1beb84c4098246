"""The query API over HTTP, against the real app and a real read database.

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pymysql
import pytest
import redis.asyncio
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.engine import Engine

from kessai.auth import ADMIN, USERS_READ, merchant_scope
from kessai.broker import free_port
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.events import PaymentCaptured
from kessai.schema.read import payments
from kessai.settings import DEFAULT_TOPIC, Settings
from query_service import export
from query_service import repository as query_repository
from query_service.app import create_app
from query_service.cursor import Position, encode_cursor
from tests.helpers import UNBOUNDED_IN_FLIGHT, UNLIMITED, api_key, bearer
from tests.integration.read_model import (
    captured,
    insert_payment_rows,
    migrated_read_db,
    payment_row,
    project,
    refunded,
    server_execute,
    set_merchant_time_zone,
    write_offsets,
)

TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 24, 16, 30, tzinfo=UTC)
REDIS_URL = os.environ.get("KESSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mysql"])
def read_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty read database: a SQLite file, or a fresh MySQL database."""
    server = request.getfixturevalue("mysql_server") if request.param == "mysql" else None
    with migrated_read_db(request.param, tmp_path, server) as url:
        yield url


@pytest.fixture
def sqlite_read_db_url(tmp_path: Path) -> Iterator[str]:
    with migrated_read_db("sqlite", tmp_path, None) as url:
        yield url


@pytest.fixture
def mysql_read_db_url(mysql_server: str, tmp_path: Path) -> Iterator[str]:
    with migrated_read_db("mysql", tmp_path, mysql_server) as url:
        yield url


def _writer(url: str) -> Iterator[Engine]:
    engine = create_db_engine(url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def writer(read_db_url: str) -> Iterator[Engine]:
    """Writes the read database as the projector does (the query API never can)."""
    yield from _writer(read_db_url)


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


@pytest.fixture
async def api(read_db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(query_settings(read_db_url, tmp_path)) as (_, client):
        yield client


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


# -- helpers ---------------------------------------------------------------------------------


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


# -- a payment -------------------------------------------------------------------------------


async def test_payment_detail_has_every_column_and_its_refunds(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    payment = captured(
        at=T0,
        merchant_id="shop-a",
        user_id="user-7",
        amount=5000,
        method="balance",
        store_id="store-9",
        order_ref="order-1",
        metadata={"campaign": "tv", "note": "x"},
    )
    first = refunded(payment, at=T0 + timedelta(days=1), amount=1200, reason="damaged")
    second = refunded(
        payment, at=T0 + timedelta(days=2), amount=300, version=3, refunded_total=1500
    )
    untouched = captured(at=T0, merchant_id="shop-a")
    project(writer, [payment, untouched, first])
    project(writer, [second])  # a later batch, as it would arrive

    response = await api.get(f"/v1/payments/{payment.payment_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.pop("as_of") is None
    assert body.pop("lag_seconds") is None
    assert body == {
        "payment_id": str(payment.payment_id),
        "merchant_id": "shop-a",
        "user_id": "user-7",
        "store_id": "store-9",
        "order_ref": "order-1",
        "method": "balance",
        "currency": "JPY",
        "captured_amount": 5000,
        "refunded_amount": 1500,
        "status": "partially_refunded",
        "version": 3,
        "metadata": {"campaign": "tv", "note": "x"},
        "created_at": T0.isoformat(),
        "updated_at": (T0 + timedelta(days=2)).isoformat(),
        "refunds": [
            {
                "refund_id": str(r.payload.refund_id),
                "payment_id": str(payment.payment_id),
                "merchant_id": "shop-a",
                "version": r.version,
                "amount": r.payload.amount,
                "currency": "JPY",
                "reason": r.payload.reason,
                "created_at": r.occurred_at.isoformat(),
            }
            for r in (first, second)
        ],
    }

    response = await api.get(f"/v1/payments/{untouched.payment_id}")
    assert response.json()["refunds"] == []
    assert response.json()["status"] == "captured"

    missing = uuid.uuid4()
    error = assert_error(await api.get(f"/v1/payments/{missing}"), 404, "payment_not_found")
    assert error["details"] == {"payment_id": str(missing)}
    assert_error(await api.get("/v1/payments/not-a-uuid"), 422, "validation_error")


# -- a merchant's list -----------------------------------------------------------------------


async def test_merchant_list_is_newest_first_and_every_filter_narrows_it(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    def at_tokyo(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
        return datetime(2026, 11, day, hour, minute, second, tzinfo=TOKYO)

    # (time, user, store, method, amount, refund): refund "part" or "all" or None.
    specs = [
        (at_tokyo(19, 23, 59, 59), "user-1", "store-x", "card", 100, None),
        (at_tokyo(20, 0, 0, 0), "user-1", "store-x", "card", 500, None),  # first instant of 11-20
        (at_tokyo(20, 9), "user-2", "store-y", "balance", 1500, "part"),
        (at_tokyo(20, 9), "user-3", "store-y", "card", 2000, None),  # same instant: id decides
        (at_tokyo(20, 23, 59, 59), "user-2", None, "balance", 2001, "all"),
        (at_tokyo(21, 0, 0, 0), "user-1", "store-x", "card", 499, None),  # first of 11-21
        (at_tokyo(21, 12), "user-3", "store-x", "balance", 10_000, "part"),
        (at_tokyo(22, 8), "user-2", "store-y", "card", 750, None),
    ]
    events: list[Any] = []
    rows: list[dict[str, Any]] = []
    for at, user, store, method, amount, refund in specs:
        payment = captured(
            at=at.astimezone(UTC),
            merchant_id="shop-a",
            user_id=user,
            store_id=store,
            method=method,
            amount=amount,
        )
        events.append(payment)
        status = "captured"
        if refund is not None:
            part = amount if refund == "all" else 1
            events.append(
                refunded(payment, at=payment.occurred_at + timedelta(hours=1), amount=part)
            )
            status = "refunded" if refund == "all" else "partially_refunded"
        rows.append(
            {
                "event": payment,
                "user_id": user,
                "store_id": store,
                "method": method,
                "amount": amount,
                "status": status,
            }
        )
    # Another merchant with the same users and stores: never part of shop-a's answers.
    events.extend(
        captured(at=at_tokyo(20, 10), merchant_id="shop-b", user_id=u, store_id="store-x")
        for u in ("user-1", "user-2")
    )
    project(writer, events)

    def expect(keep: Any) -> list[str]:
        return newest_first([r["event"] for r in rows if keep(r)])

    def created(r: dict[str, Any]) -> datetime:
        at: datetime = r["event"].occurred_at
        return at

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, expect(lambda r: True)),
        ({"status": "captured"}, expect(lambda r: r["status"] == "captured")),
        ({"status": "partially_refunded"}, expect(lambda r: r["status"] == "partially_refunded")),
        ({"status": "refunded"}, expect(lambda r: r["status"] == "refunded")),
        ({"method": "balance"}, expect(lambda r: r["method"] == "balance")),
        ({"user_id": "user-2"}, expect(lambda r: r["user_id"] == "user-2")),
        ({"store_id": "store-x"}, expect(lambda r: r["store_id"] == "store-x")),
        ({"min_amount": 500}, expect(lambda r: r["amount"] >= 500)),
        ({"max_amount": 2000}, expect(lambda r: r["amount"] <= 2000)),
        ({"min_amount": 500, "max_amount": 2000}, expect(lambda r: 500 <= r["amount"] <= 2000)),
        # Dates are whole days in the merchant's zone (Tokyo): `to` includes its whole day.
        (
            {"from": "2026-11-20", "to": "2026-11-20"},
            expect(lambda r: at_tokyo(20, 0) <= created(r) < at_tokyo(21, 0)),
        ),
        ({"from": "2026-11-21"}, expect(lambda r: created(r) >= at_tokyo(21, 0))),
        ({"to": "2026-11-19"}, expect(lambda r: created(r) < at_tokyo(20, 0))),
        # Datetimes are instants: `from` inclusive, `to` exclusive.
        (
            {"from": "2026-11-20T00:00:00+09:00", "to": "2026-11-21T00:00:00Z"},
            expect(lambda r: at_tokyo(20, 0) <= created(r) < datetime(2026, 11, 21, tzinfo=UTC)),
        ),
        (
            {"from": "2026-11-20T00:00:00Z", "to": "2026-11-21T00:00:00+09:00"},
            expect(lambda r: datetime(2026, 11, 20, tzinfo=UTC) <= created(r) < at_tokyo(21, 0)),
        ),
        (
            {"status": "captured", "method": "card", "min_amount": 500, "from": "2026-11-20"},
            expect(
                lambda r: (
                    r["status"] == "captured"
                    and r["method"] == "card"
                    and r["amount"] >= 500
                    and created(r) >= at_tokyo(20, 0)
                )
            ),
        ),
    ]
    for params, expected in cases:
        response = await api.get("/v1/merchants/shop-a/payments", params={**params, "limit": 500})
        assert response.status_code == 200, (params, response.text)
        body = response.json()
        assert ids_of(body) == expected, params
        assert body["next_cursor"] is None
        assert {item["merchant_id"] for item in body["items"]} <= {"shop-a"}
    assert len(cases[0][1]) == len(specs)

    body = (await api.get("/v1/merchants/shop-nobody/payments")).json()
    assert body["items"] == []
    assert body["next_cursor"] is None


async def test_paging_1000_payments_returns_each_once_in_order(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    events = [
        # Three payments share each instant, so the payment id must break ties.
        captured(at=base + timedelta(seconds=i // 3), merchant_id=merchant)
        for i in range(500)
        for merchant in ("shop-a", "shop-b")
    ]
    for start in range(0, len(events), 250):
        project(writer, events[start : start + 250])

    for merchant in ("shop-a", "shop-b"):
        items, pages = await page_through(api, f"/v1/merchants/{merchant}/payments", limit=37)
        expected = newest_first([e for e in events if e.merchant_id == merchant])
        assert [i["payment_id"] for i in items] == expected
        assert len(set(expected)) == 500
        assert pages == 14  # ceil(500 / 37): no trailing empty page
        assert {i["merchant_id"] for i in items} == {merchant}


async def test_paging_10000_payments_while_more_are_projected_skips_and_repeats_none(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    existing = [
        captured(at=base + timedelta(seconds=10 * (i // 2)), merchant_id="shop-a")
        for i in range(10_000)
    ]
    for start in range(0, len(existing), 2_000):
        project(writer, existing[start : start + 2_000])
    arrived: list[PaymentCaptured] = []

    def project_more(page: int) -> None:
        late = [
            captured(at=utcnow(), merchant_id="shop-a"),  # newer than all: before the cursor
            captured(at=base + timedelta(seconds=3 * page), merchant_id="shop-a"),
            captured(at=base + timedelta(seconds=50_000 - 2_000 * page), merchant_id="shop-a"),
            captured(at=base - timedelta(days=1), merchant_id="shop-a"),  # older than all
        ]
        arrived.extend(late)
        project(writer, late)

    items, pages = await page_through(
        api, "/v1/merchants/shop-a/payments", limit=500, between=project_more
    )
    assert pages >= 20
    seen = [i["payment_id"] for i in items]
    assert len(seen) == len(set(seen)), "a payment was returned twice"
    assert {str(e.payment_id) for e in existing} <= set(seen), "a payment was skipped"
    assert set(seen) <= {str(e.payment_id) for e in existing + arrived}
    keys = [sort_key(i) for i in items]
    assert keys == sorted(keys, reverse=True)
    assert len(set(keys)) == len(keys)
    assert arrived, "the data changed while paging"


async def test_a_cursor_the_api_did_not_issue_is_400_invalid_cursor(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    events = [captured(at=T0 + timedelta(seconds=i), merchant_id="shop-a") for i in range(3)]
    project(writer, events)
    good = (await api.get("/v1/merchants/shop-a/payments", params={"limit": 1})).json()
    cursor = good["next_cursor"]
    assert cursor

    def b64(raw: bytes) -> str:
        import base64

        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payment_hex = events[0].payment_id.hex
    bad = [
        "",
        "abc",
        "!!!!",
        "x" * 300,
        cursor + "=",  # padding this API never writes
        cursor[:-2],  # truncated
        cursor + "AA",
        b64(b"not json"),
        b64(b"{}"),
        b64(b"[1, 2]"),
        b64(f'[2, 1, "{payment_hex}"]'.encode()),  # unknown version
        b64(f'[1, -5, "{payment_hex}"]'.encode()),
        b64(f'[1, 1.5, "{payment_hex}"]'.encode()),
        b64(f'[1, 99999999999999999999999, "{payment_hex}"]'.encode()),
        b64(f'[1, 1, "{payment_hex.upper()}"]'.encode()),
        b64(b'[1, 1, "not-a-uuid"]'),
        b64(f'[true, 1, "{payment_hex}"]'.encode()),
        b64(f'[1,1,"{payment_hex}",0]'.encode()),
        b64(f'[1, 1, "{payment_hex}"]'.encode()),  # spaces: not the spelling the API writes
    ]
    for token in bad:
        for path in ("/v1/merchants/shop-a/payments", "/v1/users/user-1/payments"):
            response = await api.get(path, params={"cursor": token})
            assert_error(response, 400, "invalid_cursor")

    # The same position, spelled as the API spells it, is accepted.
    payment = events[1]
    token = encode_cursor_for(payment)
    response = await api.get("/v1/merchants/shop-a/payments", params={"cursor": token})
    assert ids_of(response.json()) == [str(events[0].payment_id)]


def encode_cursor_for(payment: PaymentCaptured) -> str:
    from query_service.cursor import Position

    return encode_cursor(Position(payment.occurred_at, payment.payment_id))


# -- a user's history ------------------------------------------------------------------------


async def test_user_history_spans_merchants_and_holds_only_that_user(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    mine = [
        captured(at=base + timedelta(minutes=i // 2), merchant_id=f"shop-{i % 3}", user_id="u-42")
        for i in range(30)
    ]
    others = [
        captured(at=base + timedelta(minutes=i), merchant_id="shop-0", user_id=f"u-{i}")
        for i in range(10)
    ]
    project(writer, mine + others)
    items, pages = await page_through(api, "/v1/users/u-42/payments", limit=7)
    assert [i["payment_id"] for i in items] == newest_first(mine)
    assert pages == 5
    assert {i["merchant_id"] for i in items} == {"shop-0", "shop-1", "shop-2"}
    body = (await api.get("/v1/users/u-nobody/payments")).json()
    assert body["items"] == []
    assert body["next_cursor"] is None


# -- summaries -------------------------------------------------------------------------------


def bucket_map(currency_entry: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Non-empty buckets of a currency, by bucket label, without the label fields."""
    return {
        b["bucket"]: {k: v for k, v in b.items() if k not in {"bucket", "start"}}
        for b in currency_entry["buckets"]
        if b["payments_count"] or b["refunds_count"]
    }


def totals(pc: int, pa: int, rc: int = 0, ra: int = 0) -> dict[str, int]:
    return {
        "payments_count": pc,
        "payments_amount": pa,
        "refunds_count": rc,
        "refunds_amount": ra,
        "net_amount": pa - ra,
    }


async def test_summary_by_day_and_hour_is_exact_in_the_merchants_time_zone(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    p1 = captured(at=T0, merchant_id="shop-a", amount=1000)  # 11-25 01:30 in Tokyo
    p2 = captured(
        at=datetime(2026, 11, 24, 14, 59, 59, tzinfo=UTC), merchant_id="shop-a", amount=2000
    )
    p3 = captured(
        at=datetime(2026, 11, 25, 3, 10, tzinfo=UTC),
        merchant_id="shop-a",
        amount=1999,
        currency="USD",
    )
    p4 = captured(at=datetime(2026, 11, 25, 3, 50, tzinfo=UTC), merchant_id="shop-a", amount=500)
    late_refund = refunded(p2, at=datetime(2026, 11, 26, 0, 15, tzinfo=UTC), amount=700)
    same_day_refund = refunded(p1, at=datetime(2026, 11, 25, 5, 0, tzinfo=UTC), amount=100)
    elsewhere = captured(at=T0, merchant_id="shop-b", amount=123_456)
    ny = captured(at=T0, merchant_id="shop-ny", amount=42)
    set_merchant_time_zone(writer, "shop-ny", "America/New_York")
    zones = {"shop-ny": "America/New_York"}
    project(
        writer,
        [p1, p2, p3, p4, late_refund, same_day_refund, elsewhere, ny],
        zone=lambda m: zones.get(m, "Asia/Tokyo"),
    )

    path = "/v1/merchants/shop-a/summary"
    response = await api.get(path, params={"from": "2026-11-24", "to": "2026-11-26"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["time_zone"] == "Asia/Tokyo"
    assert body["granularity"] == "day"
    assert body["from"] == "2026-11-24T00:00:00+09:00"
    assert body["to"] == "2026-11-27T00:00:00+09:00"
    jpy, usd = body["currencies"]
    assert jpy["currency"] == "JPY"
    assert usd["currency"] == "USD"
    for entry in (jpy, usd):
        assert [b["bucket"] for b in entry["buckets"]] == ["2026-11-24", "2026-11-25", "2026-11-26"]
        assert [b["start"] for b in entry["buckets"]] == [
            f"2026-11-{d}T00:00:00+09:00" for d in (24, 25, 26)
        ]
    assert {k: v for k, v in jpy.items() if k not in {"currency", "buckets"}} == totals(
        3, 3500, 2, 800
    )
    assert bucket_map(jpy) == {
        "2026-11-24": totals(1, 2000),
        "2026-11-25": totals(2, 1500, 1, 100),
        "2026-11-26": totals(0, 0, 1, 700),  # the refund counts on its own day
    }
    assert {k: v for k, v in usd.items() if k not in {"currency", "buckets"}} == totals(1, 1999)
    assert bucket_map(usd) == {"2026-11-25": totals(1, 1999)}
    assert usd["buckets"][0] == {
        "bucket": "2026-11-24",
        "start": "2026-11-24T00:00:00+09:00",
        **totals(0, 0),
    }

    response = await api.get(
        path, params={"from": "2026-11-25", "to": "2026-11-25", "granularity": "hour"}
    )
    body = response.json()
    assert body["from"] == "2026-11-25T00:00:00+09:00"
    assert body["to"] == "2026-11-26T00:00:00+09:00"
    jpy, usd = body["currencies"]
    assert [b["bucket"] for b in jpy["buckets"]] == [f"2026-11-25T{h:02d}:00:00" for h in range(24)]
    assert bucket_map(jpy) == {
        "2026-11-25T01:00:00": totals(1, 1000),
        "2026-11-25T12:00:00": totals(1, 500),
        "2026-11-25T14:00:00": totals(0, 0, 1, 100),
    }
    assert bucket_map(usd) == {"2026-11-25T12:00:00": totals(1, 1999)}

    # Instants: buckets overlapping [01:00, 13:00) Tokyo, the 14:00 refund outside.
    response = await api.get(
        path,
        params={
            "from": "2026-11-25T01:00:00+09:00",
            "to": "2026-11-25T04:00:00Z",
            "granularity": "hour",
        },
    )
    body = response.json()
    jpy = body["currencies"][0]
    assert len(jpy["buckets"]) == 12
    assert {k: v for k, v in jpy.items() if k not in {"currency", "buckets"}} == totals(2, 1500)

    # The merchant's own time zone: 2026-11-24T16:30Z is the 24th in New York.
    body = (await api.get("/v1/merchants/shop-ny/summary", params={"to": "2026-11-24"})).json()
    assert body["time_zone"] == "America/New_York"
    assert body["from"] == "2026-11-24T00:00:00-05:00"
    assert bucket_map(body["currencies"][0]) == {"2026-11-24": totals(1, 42)}

    # Nothing in range: no currencies.
    body = (await api.get(path, params={"from": "2026-10-01", "to": "2026-10-31"})).json()
    assert body["currencies"] == []


async def test_summary_defaults_to_today_and_refuses_bad_ranges(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    now = utcnow()
    project(writer, [captured(at=now, merchant_id="shop-a", amount=321)])
    local_now = now.astimezone(TOKYO)

    body = (await api.get("/v1/merchants/shop-a/summary")).json()
    assert body["granularity"] == "day"
    assert [b["bucket"] for b in body["currencies"][0]["buckets"]] == [local_now.date().isoformat()]
    assert body["currencies"][0]["payments_amount"] == 321

    body = (await api.get("/v1/merchants/shop-a/summary", params={"granularity": "hour"})).json()
    buckets = body["currencies"][0]["buckets"]
    assert len(buckets) == 24
    hour = local_now.replace(minute=0, second=0, microsecond=0, tzinfo=None).isoformat()
    assert bucket_map(body["currencies"][0]) == {hour: totals(1, 321)}

    path = "/v1/merchants/shop-a/summary"
    ok = [
        {"from": "2024-01-01", "to": "2024-12-31"},  # 366 days
        {"from": "2026-11-01", "to": "2026-12-01", "granularity": "hour"},  # 31 * 24 hours
    ]
    for params in ok:
        assert (await api.get(path, params=params)).status_code == 200, params
    too_large = [
        {"from": "2024-01-01", "to": "2025-01-01"},
        {"from": "2026-11-01", "to": "2026-12-02", "granularity": "hour"},
        {"from": "1970-01-01", "to": "9998-12-31"},
    ]
    for params in too_large:
        error = assert_error(await api.get(path, params=params), 422, "range_too_large")
        assert error["details"]["max_buckets"] in {366, 744}
    invalid = [
        {"granularity": "week"},
        {"from": "2026-11-02", "to": "2026-11-01"},
        {"from": "2026-11-02T10:00:00"},  # naive
        {"to": "tomorrow"},
        {"from": "0001-01-01", "to": "9999-12-31"},
        {"to": "9999-12-31T23:59:59-05:00"},
    ]
    for params in invalid:
        assert_error(await api.get(path, params=params), 422, "validation_error")


# -- CSV -------------------------------------------------------------------------------------


async def test_csv_export_quotes_round_trip_and_applies_the_filters(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    tricky_store = 'Shibuya, "East"\nfloor 2'
    tricky_order = 'a,b;"c"\r\nd'
    tricky = captured(
        at=T0,
        merchant_id="shop-a",
        store_id=tricky_store,
        order_ref=tricky_order,
        metadata={"note": 'x,"y"'},
    )
    plain = [
        captured(at=T0 + timedelta(minutes=i), merchant_id="shop-a", amount=100 + i)
        for i in range(5)
    ]
    gone = captured(at=T0 + timedelta(hours=1), merchant_id="shop-a", amount=50)
    project(writer, [tricky, *plain, gone, refunded(gone, at=T0 + timedelta(hours=2), amount=50)])
    project(writer, [captured(at=T0, merchant_id="shop-b")])

    response = await api.get("/v1/merchants/shop-a/payments.csv", params={"status": "captured"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="payments-shop-a-')
    assert disposition.endswith('.csv"')
    table = list(csv.reader(io.StringIO(response.content.decode("utf-8"), newline="")))
    assert table[0] == list(export.COLUMNS)
    records = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    assert [r["payment_id"] for r in records] == newest_first([tricky, *plain])
    by_id = {r["payment_id"]: r for r in records}
    row = by_id[str(tricky.payment_id)]
    assert row["store_id"] == tricky_store
    assert row["order_ref"] == tricky_order
    assert row["metadata"] == '{"note":"x,\\"y\\""}'
    assert row["created_at"] == T0.isoformat()
    assert row["captured_amount"] == "1000"
    assert by_id[str(plain[0].payment_id)]["store_id"] == ""

    # The same filters as the list, the same rows.
    listed = await api.get("/v1/merchants/shop-a/payments", params={"status": "captured"})
    assert ids_of(listed.json()) == [r["payment_id"] for r in records]
    response = await api.get("/v1/merchants/shop-a/payments.csv", params={"min_amount": 103})
    assert len(list(csv.reader(io.StringIO(response.text, newline="")))) == 1 + 3
    assert_error(
        await api.get("/v1/merchants/shop-a/payments.csv", params={"status": "lost"}),
        422,
        "validation_error",
    )


async def test_csv_export_over_the_row_cap_is_refused_up_front(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    project(
        writer,
        [
            captured(at=T0 + timedelta(minutes=i), merchant_id="shop-a", amount=10 + i)
            for i in range(6)
        ],
    )
    async with running(query_settings(read_db_url, tmp_path, csv_max_rows=5)) as (_, client):
        error = assert_error(
            await client.get("/v1/merchants/shop-a/payments.csv"), 422, "csv_too_large"
        )
        assert error["details"] == {"max_rows": 5}
        response = await client.get("/v1/merchants/shop-a/payments.csv", params={"min_amount": 11})
        assert response.status_code == 200
        assert len(list(csv.reader(io.StringIO(response.text, newline="")))) == 1 + 5


async def stream_get(app: FastAPI, path: str, key: str) -> tuple[int, int, int]:
    """Call the app's ASGI interface directly and discard the body as it arrives (an HTTP
    client would buffer it). Returns the status, the number of body chunks and of lines."""
    status = 0
    chunks = 0
    lines = 0
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, chunks, lines
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                chunks += 1
                lines += body.count(b"\n")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"query.test"), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("query.test", 80),
    }
    await app(scope, receive, send)
    return status, chunks, lines


async def test_sqlite_csv_export_of_100k_rows_streams_in_flat_memory(
    sqlite_read_db_url: str, tmp_path: Path
) -> None:
    rows_total = 100_000
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for engine in _writer(sqlite_read_db_url):
        insert_payment_rows(
            engine,
            [
                payment_row(
                    created_at=base + timedelta(seconds=i),
                    merchant_id="shop-big",
                    user_id=f"user-{i % 997}",
                    amount=100 + i,
                    store_id=f"store-{i % 50}",
                    order_ref=f"order-{i}",
                )
                for i in range(rows_total)
            ],
        )
    settings = query_settings(sqlite_read_db_url, tmp_path)
    key = api_key(settings, merchant_scope("shop-big"))
    async with running(settings) as (app, _):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            status, chunks, lines = await stream_get(
                app, "/v1/merchants/shop-big/payments.csv", key
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == 200
    assert lines == 1 + rows_total
    assert chunks > 50, "the body was not streamed in chunks"
    # The whole file is about 20 MB; rows held at once are one chunk of 1,000.
    assert peak < 15 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_mysql_a_page_after_a_cursor_reads_from_the_cursor_not_from_the_newest_row(
    mysql_read_db_url: str,
) -> None:
    """A deep page costs what the first page costs: the statement sent for it (captured as it
    runs) reads about one page of index entries (MariaDB's ANALYZE), not every newer row."""
    rows_total, depth = 30_000, 20_000
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        payment_row(created_at=base + timedelta(seconds=i), merchant_id="shop-big")
        for i in range(rows_total)
    ] + [
        payment_row(created_at=base + timedelta(seconds=i), merchant_id=f"shop-{i % 50}")
        for i in range(2 * rows_total)
    ]
    for engine in _writer(mysql_read_db_url):
        insert_payment_rows(engine, rows)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE TABLE payments")
    engine = create_db_engine(mysql_read_db_url, pool_size=1)
    try:
        where = query_repository.merchant_payments_where(
            "shop-big", start=None, end=None, status=None, method=None, user_id=None,
            store_id=None, min_amount=None, max_amount=None,
        )  # fmt: skip
        with engine.connect() as conn:
            newest_first = query_repository.payments_page(
                conn, where, after_position=None, limit=depth + 1
            )
            cursor = Position(newest_first[-1].created_at, newest_first[-1].payment_id)
            sent: list[tuple[str, Any]] = []

            def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
                sent.append((statement, params))

            sa.event.listen(engine, "before_cursor_execute", capture)
            try:
                page = query_repository.payments_page(conn, where, after_position=cursor, limit=51)
            finally:
                sa.event.remove(engine, "before_cursor_execute", capture)
            ((statement, params),) = sent
            plan = orjson.loads(
                conn.exec_driver_sql(f"ANALYZE FORMAT=JSON {statement}", params).scalar_one()
            )
    finally:
        engine.dispose()
    assert [r.payment_id for r in page] == [
        r["payment_id"] for r in sorted(rows[:rows_total], key=lambda r: r["created_at"])
    ][rows_total - depth - 2 : rows_total - depth - 53 : -1]
    read = _r_rows(plan)
    assert 0 < read <= 60, f"a page {depth} rows deep read {read} rows"


def _r_rows(plan: Any) -> int:
    """Rows read from ``payments`` in an ``ANALYZE FORMAT=JSON`` plan (wherever it nests the
    table: under a sort or a limit node, say)."""
    if isinstance(plan, dict):
        table = plan.get("table")
        if isinstance(table, dict) and table.get("table_name") == "payments":
            return int(table["r_rows"])
        found = [_r_rows(v) for v in plan.values() if isinstance(v, dict | list)]
    elif isinstance(plan, list):
        found = [_r_rows(v) for v in plan]
    else:
        return -1
    return max(found, default=-1)


# -- freshness -------------------------------------------------------------------------------


async def test_every_data_response_says_how_fresh_it_is(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    payment = captured(at=T0, merchant_id="shop-a", user_id="user-1")
    project(writer, [payment])
    routes = [
        ("/v1/payments/{payment_id}", f"/v1/payments/{payment.payment_id}"),
        ("/v1/merchants/{merchant_id}/payments", "/v1/merchants/shop-a/payments"),
        ("/v1/users/{user_id}/payments", "/v1/users/user-1/payments"),
        ("/v1/merchants/{merchant_id}/summary", "/v1/merchants/shop-a/summary"),
        (
            "/v1/merchants/{merchant_id}/summary",
            "/v1/merchants/shop-a/summary?from=2026-11-25&to=2026-11-25",
        ),
        ("/v1/admin/reconciliation/runs", "/v1/admin/reconciliation/runs"),
    ]
    paths = [path for _, path in routes]
    settings = query_settings(read_db_url, tmp_path)
    async with running(settings) as (_, client):
        # Every route but the probes is covered (a new one must be added here).
        documented = set((await client.get("/openapi.json")).json()["paths"])
        csv_route = "/v1/merchants/{merchant_id}/payments.csv"
        assert documented - {"/healthz", "/readyz"} == {t for t, _ in routes} | {csv_route}
        for path in paths:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            assert response.json()["as_of"] is None
            assert response.json()["lag_seconds"] is None
            assert "x-kessai-as-of" not in response.headers

    now = utcnow()
    write_offsets(
        writer,
        {
            0: (now - timedelta(seconds=30), now - timedelta(seconds=5)),  # fresh: 5 s
            1: (now - timedelta(seconds=20), None),  # the stalest partition: 20 s
            2: (now - timedelta(seconds=40), now - timedelta(seconds=8)),  # 8 s
            3: (None, None),  # nothing applied yet: says nothing
        },
    )
    write_offsets(writer, {0: (now - timedelta(hours=1), None)}, topic="another.topic")
    expected = now - timedelta(seconds=20)
    async with running(settings) as (_, client):
        for path in [*paths, "/v1/merchants/shop-a/payments.csv"]:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            header_as_of = datetime.fromisoformat(response.headers["x-kessai-as-of"])
            header_lag = float(response.headers["x-kessai-lag-seconds"])
            assert header_as_of == expected
            assert 20 <= header_lag < 30
            if path.endswith(".csv"):
                continue
            body = response.json()
            assert datetime.fromisoformat(body["as_of"]) == expected
            assert body["lag_seconds"] == pytest.approx(header_lag, abs=0.01)
        # A 404 still says how far the projector has got.
        response = await client.get(f"/v1/payments/{uuid.uuid4()}")
        assert response.status_code == 404
        assert datetime.fromisoformat(response.headers["x-kessai-as-of"]) == expected


# -- caches ----------------------------------------------------------------------------------


async def test_a_thousand_concurrent_summaries_cost_a_handful_of_queries(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    project(writer, [captured(at=utcnow(), merchant_id="shop-hot", amount=700)])
    settings = query_settings(read_db_url, tmp_path, summary_cache_seconds=30)
    async with running(settings) as (app, client):
        log = StatementLog(app.state.read_engine)
        responses = await asyncio.gather(
            *(client.get("/v1/merchants/shop-hot/summary") for _ in range(1000))
        )
        log.close()
    assert all(r.status_code == 200 for r in responses)
    bodies = [r.json() for r in responses]
    for body in bodies:
        body.pop("lag_seconds")
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["currencies"][0]["payments_amount"] == 700
    # One time-zone lookup, one freshness read, one totals scan (plus BEGINs on SQLite).
    assert len(log.touching("merchant_daily_totals")) == 1
    assert len(log.statements) <= 10, log.statements


async def test_a_cached_summary_keeps_the_freshness_it_was_computed_with(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    now = utcnow()
    project(writer, [captured(at=now, merchant_id="shop-a", amount=100)])
    first_as_of = now - timedelta(seconds=60)
    write_offsets(writer, {0: (first_as_of, None)})
    settings = query_settings(read_db_url, tmp_path, summary_cache_seconds=30)
    async with running(settings) as (_, client):
        body = (await client.get("/v1/merchants/shop-a/summary")).json()
        assert body["currencies"][0]["payments_amount"] == 100
        assert datetime.fromisoformat(body["as_of"]) == first_as_of

        project(writer, [captured(at=now, merchant_id="shop-a", amount=5)])
        write_offsets(writer, {0: (utcnow(), None)})
        await asyncio.sleep(0.6)  # past the freshness cache

        response = await client.get("/v1/merchants/shop-a/summary")
        cached = response.json()
        assert cached["currencies"][0]["payments_amount"] == 100  # served from the cache...
        assert datetime.fromisoformat(cached["as_of"]) == first_as_of  # ...with its own as_of
        assert cached["lag_seconds"] >= 60
        assert cached["lag_seconds"] > body["lag_seconds"]
        assert float(response.headers["x-kessai-lag-seconds"]) >= 60

        # An explicit range is not cached: it sees the new payment and the new position.
        today = now.astimezone(TOKYO).date().isoformat()
        fresh = (
            await client.get("/v1/merchants/shop-a/summary", params={"from": today, "to": today})
        ).json()
        assert fresh["currencies"][0]["payments_amount"] == 105
        assert fresh["lag_seconds"] < 5


async def test_the_summary_cache_lives_in_redis_when_configured(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    merchant = f"shop-{uuid.uuid4().hex[:12]}"  # keys of this test only
    now = utcnow()
    project(writer, [captured(at=now, merchant_id=merchant, amount=900)])
    as_of = now - timedelta(seconds=3)
    write_offsets(writer, {0: (as_of, None)})
    settings = query_settings(read_db_url, tmp_path, redis_url=REDIS_URL, summary_cache_seconds=30)
    client_redis = redis.asyncio.Redis.from_url(REDIS_URL)
    key = f"kessai:summary:{merchant}:day:{now.astimezone(TOKYO).date().isoformat()}"
    try:
        async with running(settings, merchants=[merchant]) as (_, first):
            computed = (await first.get(f"/v1/merchants/{merchant}/summary")).json()
        assert computed["currencies"][0]["payments_amount"] == 900
        assert await client_redis.exists(key)
        assert 0 < await client_redis.pttl(key) <= 30_000

        project(writer, [captured(at=now, merchant_id=merchant, amount=1)])
        write_offsets(writer, {0: (utcnow(), None)})
        # Another process (a second worker or replica) answers from Redis: no totals query.
        async with running(settings, merchants=[merchant]) as (app, second):
            log = StatementLog(app.state.read_engine)
            served = (await second.get(f"/v1/merchants/{merchant}/summary")).json()
            log.close()
        assert log.touching("merchant_daily_totals") == []
        assert served["currencies"] == computed["currencies"]
        assert datetime.fromisoformat(served["as_of"]) == as_of
        assert served["lag_seconds"] >= computed["lag_seconds"]
    finally:
        keys = [k async for k in client_redis.scan_iter(match=f"kessai:summary:{merchant}:*")]
        if keys:
            await client_redis.delete(*keys)
        await client_redis.aclose()


async def test_redis_down_falls_back_to_the_database_and_says_so(
    read_db_url: str, writer: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project(writer, [captured(at=utcnow(), merchant_id="shop-a", amount=77)])
    nobody_listens = f"redis://127.0.0.1:{free_port()}/0"
    settings = query_settings(
        read_db_url, tmp_path, redis_url=nobody_listens, summary_cache_seconds=30
    )
    caplog.set_level(logging.WARNING, logger="query_service.cache")
    async with running(settings) as (app, client):
        log = StatementLog(app.state.read_engine)
        for _ in range(3):
            response = await client.get("/v1/merchants/shop-a/summary")
            assert response.status_code == 200, response.text
            assert response.json()["currencies"][0]["payments_amount"] == 77
        log.close()
    assert any("Redis" in r.getMessage() for r in caplog.records)
    # While Redis is down the process caches: one totals query for the three requests.
    assert len(log.touching("merchant_daily_totals")) == 1


# -- read only -------------------------------------------------------------------------------


async def test_the_query_engine_refuses_writes(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    project(writer, [captured(at=T0, merchant_id="shop-a")])
    row = payment_row(created_at=T0, merchant_id="shop-a")
    async with running(query_settings(read_db_url, tmp_path)) as (app, client):
        engine: Engine = app.state.read_engine
        writes = [
            payments.insert().values(**row),
            payments.update().values(captured_amount=1),
            payments.delete(),
        ]
        for statement in writes:
            with pytest.raises(sa.exc.DBAPIError) as refused, engine.begin() as conn:
                conn.execute(statement)
            if engine.dialect.name == "mysql":
                # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
                assert refused.value.orig is not None
                assert refused.value.orig.args[0] == 1792
        if engine.dialect.name == "sqlite":
            # Not only the pragma: the file itself is open read-only.
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA query_only=OFF")
                with pytest.raises(sa.exc.OperationalError, match="readonly"):
                    conn.execute(payments.delete())
                conn.invalidate()  # never hand a session without the pragma back to the pool
        response = await client.get("/v1/merchants/shop-a/payments")
        assert len(response.json()["items"]) == 1
    with writer.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(payments)).scalar_one() == 1


async def test_sqlite_missing_read_db_is_not_created_and_not_ready(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "read.db"
    async with running(query_settings(f"sqlite:///{missing}", tmp_path)) as (_, client):
        assert_error(await client.get("/readyz"), 503, "read_db_unavailable")
        assert_error(await client.get("/v1/merchants/shop-a/payments"), 503, "read_db_unavailable")
    assert not missing.exists()
    assert not missing.parent.exists()


async def test_mysql_select_only_user_reads_and_cannot_write(
    mysql_read_db_url: str, mysql_server: str, tmp_path: Path
) -> None:
    url = sa.make_url(mysql_read_db_url)
    user = f"kq_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    server_execute(
        mysql_server,
        f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
        f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'%'",
    )
    try:
        for engine in _writer(mysql_read_db_url):
            project(engine, [captured(at=T0, merchant_id="shop-a")])
        select_only = url.set(username=user, password=password).render_as_string(
            hide_password=False
        )
        settings = query_settings(mysql_read_db_url, tmp_path, query_db_url=select_only)
        async with running(settings) as (app, client):
            response = await client.get("/v1/merchants/shop-a/payments")
            assert response.status_code == 200, response.text
            assert len(response.json()["items"]) == 1
            with app.state.read_engine.connect() as conn:
                # Even a session that asks for read-write is refused: the grant forbids it.
                conn.exec_driver_sql("SET SESSION TRANSACTION READ WRITE")
                with pytest.raises(sa.exc.DBAPIError) as refused:
                    conn.execute(payments.delete())
                conn.invalidate()  # never hand a read-write session back to the pool
            assert refused.value.orig is not None
            assert refused.value.orig.args[0] == 1142  # ER_TABLEACCESS_DENIED_ERROR
        plain = sa.create_engine(select_only)
        try:
            with pytest.raises(sa.exc.DBAPIError), plain.begin() as conn:
                conn.execute(
                    payments.insert().values(**payment_row(created_at=T0, merchant_id="x"))
                )
        finally:
            plain.dispose()
    finally:
        server_execute(mysql_server, f"DROP USER IF EXISTS '{user}'@'%'")


# -- validation and plumbing -----------------------------------------------------------------


async def test_malformed_requests_are_422_validation_error_naming_the_field(
    api: httpx.AsyncClient,
) -> None:
    cases = [
        ("/v1/merchants/" + "m" * 65 + "/payments", "path.merchant_id"),
        ("/v1/merchants/bad%20id/payments", "path.merchant_id"),
        ("/v1/merchants/bad.id/summary", "path.merchant_id"),
        ("/v1/merchants/shop-a/payments?limit=0", "query.limit"),
        ("/v1/merchants/shop-a/payments?limit=501", "query.limit"),
        ("/v1/merchants/shop-a/payments?limit=ten", "query.limit"),
        ("/v1/merchants/shop-a/payments?status=pending", "query.status"),
        ("/v1/merchants/shop-a/payments?method=cash", "query.method"),
        ("/v1/merchants/shop-a/payments?min_amount=-1", "query.min_amount"),
        ("/v1/merchants/shop-a/payments?max_amount=1.5", "query.max_amount"),
        ("/v1/merchants/shop-a/payments?user_id=bad!id", "query.user_id"),
        ("/v1/merchants/shop-a/payments?from=yesterday", "query.from"),
        ("/v1/merchants/shop-a/payments?from=2026-11-24T10:00:00", "query.from"),
        ("/v1/merchants/shop-a/payments?to=2026-13-01", "query.to"),
        ("/v1/merchants/shop-a/payments?from=2026-11-02&to=2026-11-01", "query.to"),
        ("/v1/merchants/shop-a/payments.csv?min_amount=x", "query.min_amount"),
        ("/v1/merchants/shop-a/summary?granularity=week", "query.granularity"),
        ("/v1/users/" + "u" * 65 + "/payments", "path.user_id"),
        ("/v1/users/u%2Fx/payments", "path.user_id"),
        ("/v1/payments/1234", "path.payment_id"),
    ]
    for path, field in cases:
        response = await api.get(path)
        if response.status_code == 404:  # an encoded slash may not even match a route
            assert path.startswith("/v1/users/u%2F")
            continue
        error = assert_error(response, 422, "validation_error")
        assert field in {e["field"] for e in error["details"]["errors"]}, (path, error)


async def test_health_readiness_metrics_and_docs(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    await api.get("/v1/merchants/shop-a/payments")
    metrics = (await api.get("/metrics")).text
    assert 'route="/v1/merchants/{merchant_id}/payments",service="query"' in metrics
    spec = (await api.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/v1/payments/{payment_id}",
        "/v1/merchants/{merchant_id}/payments",
        "/v1/merchants/{merchant_id}/payments.csv",
        "/v1/merchants/{merchant_id}/summary",
        "/v1/users/{user_id}/payments",
        "/healthz",
        "/readyz",
    }
    assert (await api.get("/docs")).status_code == 200


# -- the query plans (MySQL) -----------------------------------------------------------------


async def test_mysql_queries_use_the_intended_indexes(
    mysql_read_db_url: str, tmp_path: Path
) -> None:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    events = [
        captured(
            at=base + timedelta(minutes=17 * i),
            merchant_id=f"m-{i % 40:02d}",
            user_id=f"u-{i % 200:03d}",
            amount=100 + i % 1000,
            method="card" if i % 3 else "balance",
        )
        for i in range(4000)
    ]
    for engine in _writer(mysql_read_db_url):
        for start in range(0, len(events), 1000):
            project(engine, events[start : start + 1000])
        with engine.connect() as conn:
            for table in ("payments", "merchant_daily_totals", "merchant_hourly_totals"):
                conn.exec_driver_sql(f"ANALYZE TABLE {table}").all()

    async with running(query_settings(mysql_read_db_url, tmp_path)) as (app, client):
        log = StatementLog(app.state.read_engine)
        first = (await client.get("/v1/merchants/m-07/payments", params={"limit": 20})).json()
        requests: list[tuple[str, dict[str, Any]]] = [
            ("/v1/merchants/m-07/payments", {"limit": 20, "cursor": first["next_cursor"]}),
            (
                "/v1/merchants/m-07/payments",
                {
                    "status": "captured",
                    "method": "card",
                    "min_amount": 150,
                    "max_amount": 900,
                    "from": "2026-11-10",
                    "to": "2026-11-20",
                    "limit": 20,
                },
            ),
            ("/v1/merchants/m-07/payments.csv", {"from": "2026-11-10"}),
            ("/v1/users/u-042/payments", {"limit": 5}),
            ("/v1/merchants/m-07/summary", {"from": "2026-11-01", "to": "2026-11-30"}),
            (
                "/v1/merchants/m-07/summary",
                {"from": "2026-11-10", "to": "2026-11-12", "granularity": "hour"},
            ),
        ]
        for path, params in requests:
            response = await client.get(path, params=params)
            assert response.status_code == 200, response.text
        users = (await client.get("/v1/users/u-042/payments", params={"limit": 5})).json()
        await client.get(
            "/v1/users/u-042/payments", params={"limit": 5, "cursor": users["next_cursor"]}
        )
        log.close()

    def explain(statement: str, params: Any) -> list[dict[str, Any]]:
        url = sa.make_url(mysql_read_db_url)
        with (
            pymysql.connect(
                host=url.host,
                port=url.port or 3306,
                user=url.username,
                password=url.password or "",
                database=url.database,
            ) as conn,
            conn.cursor(pymysql.cursors.DictCursor) as cur,
        ):
            cur.execute("EXPLAIN " + statement, params)
            return list(cur.fetchall())

    expected_keys = {
        "merchant list": "ix_payments_merchant_id_created_at_payment_id",
        "user history": "ix_payments_user_id_created_at_payment_id",
        "daily totals": "PRIMARY",
        "hourly totals": "PRIMARY",
    }
    checked: dict[str, int] = dict.fromkeys(expected_keys, 0)
    for statement, params in log.statements:
        if "FROM merchant_daily_totals" in statement:
            kind, table = "daily totals", "merchant_daily_totals"
        elif "FROM merchant_hourly_totals" in statement:
            kind, table = "hourly totals", "merchant_hourly_totals"
        elif "FROM payments" in statement and "payments.merchant_id =" in statement:
            kind, table = "merchant list", "payments"
        elif "FROM payments" in statement and "payments.user_id =" in statement:
            kind, table = "user history", "payments"
        else:
            continue
        plan = [row for row in explain(statement, params) if row["table"] == table]
        assert plan, (statement, explain(statement, params))
        for row in plan:
            assert row["type"] != "ALL", (kind, statement, row)
            assert row["key"] == expected_keys[kind], (kind, statement, row)
            assert "filesort" not in (row["Extra"] or ""), (kind, statement, row)
        checked[kind] += 1
    # list: 3 pages + the export's count and chunk; history: 2 pages; one scan per summary.
    assert checked == {"merchant list": 5, "user history": 3, "daily totals": 1, "hourly totals": 1}
