"""The query API over HTTP: CSV exports, their quoting, their cap and their memory.

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import tracemalloc
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from kessai.auth import merchant_scope
from query_service import export
from tests.helpers import api_key
from tests.integration.query_api.helpers import (
    T0,
    assert_error,
    ids_of,
    newest_first,
    query_settings,
    read_db_writer,
    running,
)
from tests.integration.read_model import (
    captured,
    insert_payment_rows,
    payment_row,
    project,
    refunded,
)

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
    for engine in read_db_writer(sqlite_read_db_url):
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
