"""Hostile input: every answer is a 4xx with a stable code, nothing is written, no stack trace
or SQL leaks, and security headers are on every response."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from kessai.auth import USERS_READ, merchant_scope
from kessai.clock import utcnow
from kessai.settings import Settings
from query_service.app import create_app as create_query_app
from tests.helpers import api_key, bearer, count_rows, fund, new_key, payment_body
from tests.integration.read_model import captured, migrated_read_db, project
from tests.pipeline import write_store_events

SQL = "x' OR '1'='1'; DROP TABLE events; --"
LEAKS = ("Traceback", "sqlalchemy", "pymysql", "SELECT ", "INSERT ", 'File "')

HOSTILE_BODIES: list[tuple[str, bytes | dict[str, Any]]] = [
    ("sql in merchant_id", payment_body(merchant_id=SQL)),
    ("sql in user_id", payment_body(user_id=SQL)),
    ("very long merchant_id", payment_body(merchant_id="m" * 10_000)),
    ("very long store_id", payment_body(store_id="s" * 5_000)),
    ("control characters", payment_body(merchant_id="shop\x00\x1b[31m")),
    ("unicode look-alike id", payment_body(merchant_id="shop-\uff11")),
    ("metadata too many keys", payment_body(metadata={f"k{i}": "v" for i in range(100)})),
    ("metadata too large", payment_body(metadata={"k": "v" * 10_000})),
    ("metadata nested", payment_body(metadata={"k": {"deep": ["x"]}})),
    ("amount negative", payment_body(amount=-1)),
    ("amount zero", payment_body(amount=0)),
    ("amount huge", payment_body(amount=10**30)),
    ("amount float", payment_body(amount=1.5)),
    ("amount string", payment_body(amount="100")),
    ("amount bool", payment_body(amount=True)),
    ("currency unknown", payment_body(currency="XXY")),
    ("currency lower case", payment_body(currency="jpy")),
    ("method unknown", payment_body(method="cash'; --")),
    ("extra field", {**payment_body(), "status": "refunded"}),
    ("array body", b"[1, 2, 3]"),
    ("deeply nested arrays", b"[" * 20_000 + b"]" * 20_000),
    ("deeply nested objects", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
    ("invalid utf-8", b'{"merchant_id": "\xff\xfe\xfd"}'),
    ("nul bytes", b"\x00\x00\x00"),
    ("truncated json", b'{"merchant_id": "shop-1", "amount": 1'),
    ("not json", b"merchant_id=shop-1&amount=100"),
]


def assert_clean_4xx(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"]
    assert isinstance(error["message"], str)
    for leak in LEAKS:
        assert leak not in response.text, leak
    assert_security_headers(response)


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize(("name", "body"), HOSTILE_BODIES, ids=[n for n, _ in HOSTILE_BODIES])
async def test_hostile_payment_bodies_are_refused_and_change_nothing(
    api: httpx.AsyncClient, write_engine: Engine, name: str, body: bytes | dict[str, Any]
) -> None:
    before = count_rows(write_engine)  # the api fixture's top-up of the payer
    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/json"}
    if isinstance(body, bytes):
        response = await api.post("/v1/payments", content=body, headers=headers)
    else:
        response = await api.post("/v1/payments", json=body, headers=headers)
    assert_clean_4xx(response)
    assert count_rows(write_engine) == before


async def test_hostile_headers_and_paths_on_the_command_api(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    before = count_rows(write_engine)  # the api fixture's top-up of the payer
    for headers in (
        {"Idempotency-Key": "k" * 300},
        {"Idempotency-Key": "has space"},
        {"Idempotency-Key": new_key(), "X-Device-Id": "d" * 500},
        {"Idempotency-Key": new_key(), "X-Padding": "p" * 20_000},  # headers over the limit
    ):
        assert_clean_4xx(await api.post("/v1/payments", json=payment_body(), headers=headers))
    for path in (
        f"/v1/payments/{SQL}/refunds",
        "/v1/payments/00000000-0000-0000-0000-00000000000g/refunds",
        "/v1/payments/" + "9" * 5000 + "/refunds",
    ):
        response = await api.post(path, json={"amount": 1}, headers={"Idempotency-Key": new_key()})
        assert_clean_4xx(response)
    assert count_rows(write_engine) == before
    ok = await api.post("/v1/payments", json=payment_body(), headers={"Idempotency-Key": "ok"})
    assert ok.status_code == 201
    assert_security_headers(ok)


@pytest.fixture
async def query(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    with migrated_read_db("sqlite", tmp_path, None) as url:
        configured = settings.model_copy(update={"read_db_url": url})
        key = api_key(configured, merchant_scope("shop-1"), USERS_READ)
        app = create_query_app(configured)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://q", headers=bearer(key)
            ) as client,
        ):
            yield client


async def test_hostile_query_parameters_are_refused(query: httpx.AsyncClient) -> None:
    for path, params in (
        (f"/v1/merchants/{SQL}/payments", {}),
        ("/v1/merchants/shop-1/payments", {"cursor": SQL}),
        ("/v1/merchants/shop-1/payments", {"cursor": "A" * 10_000}),
        ("/v1/merchants/shop-1/payments", {"limit": "100000"}),
        ("/v1/merchants/shop-1/payments", {"limit": "-1"}),
        ("/v1/merchants/shop-1/payments", {"from": SQL}),
        ("/v1/merchants/shop-1/payments", {"from": "9999-99-99"}),
        ("/v1/merchants/shop-1/payments", {"min_amount": "1e400"}),
        ("/v1/merchants/shop-1/payments", {"status": "captured' --"}),
        ("/v1/merchants/shop-1/summary", {"granularity": "minute"}),
        ("/v1/merchants/shop-1/summary", {"from": "0001-01-01", "to": "9999-12-31"}),
        ("/v1/merchants/shop-1/payments.csv", {"to": "\x00"}),
        (f"/v1/users/{SQL}/payments", {}),
        (f"/v1/payments/{SQL}", {}),
    ):
        assert_clean_4xx(await query.get(path, params=params))
    docs = await query.get("/docs")
    assert docs.status_code == 200
    assert "Content-Security-Policy" not in docs.headers  # the docs page loads its scripts
    assert docs.headers["X-Content-Type-Options"] == "nosniff"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a cell as a formula (OWASP, CSV injection)."""


async def test_csv_export_defuses_text_that_a_spreadsheet_would_run_as_a_formula(
    api: httpx.AsyncClient, write_engine: Engine, read_engine: Engine, pipeline_settings: Settings
) -> None:
    """Text a client sent that starts with =, +, -, @, tab or carriage return is exported with
    a leading `'`, so a spreadsheet opening the export shows it instead of running it; numbers
    stay numbers."""
    fund(write_engine, "-2")  # the second payer; the api fixture funded the first
    sent = [
        {"store_id": '=HYPERLINK("http://x.example","x")', "order_ref": "+cmd|' /C calc'!A0"},
        {"user_id": "-2", "store_id": "-2+3+cmd|' /C calc'!A0", "order_ref": "@SUM(1+9)"},
    ]
    for fields in sent:
        body = payment_body(merchant_id="shop-1", amount=1200, **fields)
        response = await api.post("/v1/payments", json=body, headers={"Idempotency-Key": new_key()})
        assert response.status_code == 201, response.text
    # The command API refuses control characters; the event contract does not, so tab and
    # carriage return are checked with events projected as they are.
    controls = {"store_id": "\t=1+1", "order_ref": "\r=cmd|' /C calc'!A0"}
    assert_clean_4xx(
        await api.post(
            "/v1/payments",
            json=payment_body(merchant_id="shop-1", **controls),
            headers={"Idempotency-Key": new_key()},
        )
    )
    from_outside = captured(at=utcnow(), merchant_id="shop-1", amount=1200, **controls)
    project(read_engine, [*write_store_events(write_engine), from_outside])
    hostile = [value for fields in [*sent, controls] for value in fields.values()]
    assert {value[0] for value in hostile} == set(FORMULA_STARTS)

    key = api_key(pipeline_settings, merchant_scope("shop-1"))
    app = create_query_app(pipeline_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://q", headers=bearer(key)
        ) as query,
    ):
        response = await query.get("/v1/merchants/shop-1/payments.csv")
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert len(rows) == 3
    cells = {cell for row in rows for cell in row.values()}
    for value in hostile:
        assert "'" + value in cells, value
    assert not [cell for cell in cells if cell.startswith(FORMULA_STARTS)]
    assert [row["captured_amount"] for row in rows] == ["1200"] * 3
    assert [row["refunded_amount"] for row in rows] == ["0"] * 3
