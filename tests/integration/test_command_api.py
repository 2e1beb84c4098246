"""The command API's guarantees, over HTTP against the real app and real write stores: what a
payment records, idempotency (replays, reuse, expiry, keys in flight), the operational
endpoints. Refunds are in ``test_refunds.py``, malformed requests in
``test_malformed_writes.py``.

Every test runs on SQLite and on MySQL/MariaDB (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import httpx
import pymysql
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE
from kessai.clock import utcnow
from kessai.events import wallet_stream_id
from kessai.schema.write import idempotency_keys, outbox
from kessai.settings import Settings
from tests.helpers import (
    PAYER,
    api_key,
    bearer,
    count_rows,
    fund,
    new_key,
    payment_body,
    stored_events,
    until_true,
)
from tests.integration.command_api import (
    JSON,
    PAYMENTS,
    assert_error,
    create_payment,
    json_body,
    refund,
    rows_added,
)

ONE_PAYMENT = {"events": 1, "outbox": 2, "idempotency_keys": 1}
"""What an accepted balance payment adds: its event; its outbox row and its wallet's; its key."""


@pytest.fixture
async def app_and_api(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Like the ``api`` fixture, with the app itself at hand (its ``state``); ``payment_body``'s
    payer starts with a funded wallet, as there."""
    fund(settings, PAYER)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(api_key(settings, PAYMENTS_WRITE)),
        ) as client,
    ):
        yield app, client


# --- capture ---------------------------------------------------------------------------------


def queued(engine: Engine) -> set[tuple[uuid.UUID, int, str]]:
    """(stream id, version, event type) of every row in the outbox."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.payment_id, outbox.c.version, outbox.c.event_type))
        return {(row[0], row[1], row[2]) for row in rows}


async def test_create_payment_records_one_event_one_outbox_row_one_key(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    """One event, its outbox row, one key; and its wallet's debit, queued under the wallet's
    stream at the version after the funding top-up."""
    funded, funded_queue = count_rows(write_engine), queued(write_engine)
    response = await api.post(
        PAYMENTS,
        json=payment_body(
            amount=1500, store_id="store-7", order_ref="order 42", metadata={"lane": "3"}
        ),
        headers={"Idempotency-Key": new_key(), "X-Device-Id": "pos-1"},
    )

    assert response.status_code == 201, response.text
    assert "Idempotent-Replayed" not in response.headers
    body = response.json()
    assert uuid.UUID(body["payment_id"]).version == 7
    assert body | {"payment_id": None, "created_at": None} == {
        "payment_id": None,
        "merchant_id": "merchant-1",
        "user_id": "user-1",
        "amount": 1500,
        "currency": "JPY",
        "method": "balance",
        "store_id": "store-7",
        "order_ref": "order 42",
        "metadata": {"lane": "3"},
        "status": "captured",
        "refunded_amount": 0,
        "version": 1,
        "created_at": None,
    }
    assert body["created_at"].endswith("Z") or body["created_at"].endswith("+00:00")
    assert rows_added(write_engine, funded) == ONE_PAYMENT
    assert stored_events(write_engine) == [(uuid.UUID(body["payment_id"]), 1)]
    assert queued(write_engine) - funded_queue == {
        (uuid.UUID(body["payment_id"]), 1, "PaymentCaptured"),
        (wallet_stream_id(PAYER), 2, "WalletDebited"),
    }


async def test_unicode_metadata_round_trips_and_replays_byte_identical(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = new_key()
    body = payment_body(metadata={"memo": "お釣りなし 🍣", "ключ": "значение"})
    first = await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})
    again = await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})

    assert first.status_code == 201, first.text
    assert first.json()["metadata"] == body["metadata"]
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert count_rows(write_engine)["events"] == 1


# --- idempotency -----------------------------------------------------------------------------


async def test_replay_returns_the_original_response_byte_for_byte(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    funded = count_rows(write_engine)
    key = new_key()
    first = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})
    second = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert second.status_code == first.status_code
    assert second.content == first.content
    assert second.headers["Idempotent-Replayed"] == "true"
    assert rows_added(write_engine, funded) == ONE_PAYMENT


async def test_replay_answers_the_original_response_even_after_later_changes(
    api: httpx.AsyncClient,
) -> None:
    key = new_key()
    first = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})
    assert (await refund(api, first.json()["payment_id"], 300)).status_code == 201

    again = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert again.content == first.content  # the stored answer, not the current state
    assert again.json()["status"] == "captured"


async def test_defaulted_and_explicit_currency_are_the_same_request(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    """The request is compared after normalization: currency defaults to JPY, metadata to {}."""
    key = new_key()
    implicit = payment_body()
    del implicit["currency"]
    first = await api.post(PAYMENTS, json=implicit, headers={"Idempotency-Key": key})
    explicit = await api.post(
        PAYMENTS,
        json=payment_body(currency="JPY", metadata={}, store_id=None),
        headers={"Idempotency-Key": key},
    )

    assert first.status_code == 201
    assert first.json()["currency"] == "JPY"
    assert explicit.status_code == 201
    assert explicit.headers["Idempotent-Replayed"] == "true"
    assert explicit.content == first.content
    assert count_rows(write_engine)["events"] == 1


async def test_metadata_order_does_not_make_another_request(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = new_key()
    first = await api.post(
        PAYMENTS,
        content=json_body(payment_body(metadata={"a": "1", "b": "2"})),
        headers={"Idempotency-Key": key, **JSON},
    )
    again = await api.post(
        PAYMENTS,
        content=json_body(payment_body(metadata={"b": "2", "a": "1"})),
        headers={"Idempotency-Key": key, **JSON},
    )
    assert first.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert count_rows(write_engine)["events"] == 1


async def test_same_key_with_another_body_is_refused_naming_the_fields(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = new_key()
    await create_payment(api, key=key)
    before = count_rows(write_engine)

    response = await api.post(
        PAYMENTS,
        json=payment_body(amount=2000, method="card"),
        headers={"Idempotency-Key": key},
    )

    error = assert_error(response, 422, "idempotency_key_reused")
    assert error["details"] == {"fields": ["amount", "method"]}
    assert "Idempotent-Replayed" not in response.headers
    assert count_rows(write_engine) == before


async def test_payment_key_reused_for_a_refund_names_the_operation(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = new_key()
    payment = await create_payment(api, key=key, amount=1000)
    before = count_rows(write_engine)

    response = await refund(api, payment["payment_id"], 100, key=key)

    error = assert_error(response, 422, "idempotency_key_reused")
    fields = error["details"]["fields"]
    assert "operation" in fields
    # Everything that is not the same in the two normalized requests, sorted:
    assert fields == [
        "amount",
        "currency",
        "merchant_id",
        "metadata",
        "method",
        "operation",
        "payment_id",
        "user_id",
    ]
    assert count_rows(write_engine) == before


async def test_keys_are_case_sensitive(api: httpx.AsyncClient, write_engine: Engine) -> None:
    funded = count_rows(write_engine)
    upper = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": "Key-A"})
    lower = await api.post(
        PAYMENTS, json=payment_body(amount=7), headers={"Idempotency-Key": "key-a"}
    )

    assert upper.status_code == 201, upper.text
    assert lower.status_code == 201, lower.text  # not 422 idempotency_key_reused
    assert "Idempotent-Replayed" not in lower.headers
    assert upper.json()["payment_id"] != lower.json()["payment_id"]
    assert rows_added(write_engine, funded) == {"events": 2, "outbox": 4, "idempotency_keys": 2}
    # and each still replays its own payment
    again = await api.post(
        PAYMENTS, json=payment_body(amount=7), headers={"Idempotency-Key": "key-a"}
    )
    assert again.content == lower.content


def stored_keys(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(idempotency_keys.c.idempotency_key)).scalars())


async def test_longest_allowed_key_is_stored_and_replayed(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = "K" * 254 + "~"
    funding_keys = stored_keys(write_engine)
    first = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})
    again = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert first.status_code == 201, first.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert stored_keys(write_engine) - funding_keys == {key}


async def test_refused_request_does_not_consume_its_key(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    """A refusal is not recorded: the same key then works for a valid request."""
    funded = count_rows(write_engine)
    key = new_key()
    missing = await refund(api, str(uuid.uuid4()), 100, key=key)
    assert_error(missing, 404, "payment_not_found")

    created = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert created.status_code == 201, created.text
    assert "Idempotent-Replayed" not in created.headers
    assert rows_added(write_engine, funded) == ONE_PAYMENT


async def test_expired_key_is_forgotten(api: httpx.AsyncClient, write_engine: Engine) -> None:
    funded = count_rows(write_engine)
    key = new_key()
    first = await create_payment(api, key=key, amount=100)
    still_known = await api.post(
        PAYMENTS, json=payment_body(amount=200), headers={"Idempotency-Key": key}
    )
    assert_error(still_known, 422, "idempotency_key_reused")

    with write_engine.begin() as conn:
        moved = conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.idempotency_key == key,
            )
            .values(expires_at=utcnow() - timedelta(seconds=1))
        ).rowcount
    assert moved == 1

    response = await api.post(
        PAYMENTS, json=payment_body(amount=200), headers={"Idempotency-Key": key}
    )

    assert response.status_code == 201, response.text
    assert "Idempotent-Replayed" not in response.headers
    second = response.json()
    assert second["payment_id"] != first["payment_id"]
    assert second["amount"] == 200
    # Two payments, each with its wallet's debit; one key, now the second payment's.
    assert rows_added(write_engine, funded) == {"events": 2, "outbox": 4, "idempotency_keys": 1}
    # The key now stands for the new request.
    replay = await api.post(
        PAYMENTS, json=payment_body(amount=200), headers={"Idempotency-Key": key}
    )
    assert replay.content == response.content


# --- in flight -------------------------------------------------------------------------------


@contextlib.contextmanager
def write_store_blocked(url: str) -> Iterator[None]:
    """Hold, from a connection of our own, a lock that every payment write needs."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        lite = sqlite3.connect(parsed.database, isolation_level=None)
        try:
            lite.execute("BEGIN IMMEDIATE")  # the write lock; the app waits (busy timeout)
            yield
        finally:
            lite.execute("ROLLBACK")
            lite.close()
        return
    conn = pymysql.connect(
        host=parsed.host,
        port=parsed.port or 3306,
        user=parsed.username,
        password=parsed.password or "",
        database=parsed.database,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLES events WRITE")  # the insert waits for the table lock
            try:
                yield
            finally:
                cur.execute("UNLOCK TABLES")
    finally:
        conn.close()


def mysql_waiters(url: str) -> int:
    """How many statements of this database wait for a table lock."""
    parsed = sa.make_url(url)
    with (
        pymysql.connect(
            host=parsed.host,
            port=parsed.port or 3306,
            user=parsed.username,
            password=parsed.password or "",
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE DB = %s AND STATE LIKE 'Waiting for table%%'",
            (parsed.database,),
        )
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_same_key_while_first_is_in_flight_gets_409_at_once(
    app_and_api: tuple[FastAPI, httpx.AsyncClient], settings: Settings, write_engine: Engine
) -> None:
    app, api = app_and_api
    funded = count_rows(write_engine)
    url = settings.resolved_write_db_url()
    key = new_key()
    headers = {"Idempotency-Key": key}

    async def post() -> httpx.Response:
        return await api.post(PAYMENTS, json=payment_body(), headers=headers)

    tasks: list[asyncio.Task[httpx.Response]] = []
    try:
        with write_store_blocked(url):
            first = asyncio.create_task(post())
            tasks.append(first)
            await until_true(lambda: key in {k for _, k in app.state.resources.in_flight})
            if sa.make_url(url).get_backend_name() == "mysql":
                await until_true(lambda: mysql_waiters(url) >= 1)  # really held in MySQL

            second_task = asyncio.create_task(post())
            tasks.append(second_task)
            await asyncio.wait({second_task}, timeout=2.0)
            assert second_task.done(), "the second request waited instead of answering at once"

            second = second_task.result()
            error = assert_error(second, 409, "idempotency_key_in_flight")
            assert error["details"] == {}
            assert second.headers["Retry-After"] == "1"
            await asyncio.sleep(0.2)
            assert not first.done()  # still held by the lock
        response = await asyncio.wait_for(first, timeout=30)
    finally:  # after a failed assertion the lock is released: let the requests finish
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    assert response.status_code == 201, response.text
    assert key not in {k for _, k in app.state.resources.in_flight}
    retry = await api.post(PAYMENTS, json=payment_body(), headers=headers)
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == response.content
    assert rows_added(write_engine, funded) == ONE_PAYMENT


# --- operational endpoints -------------------------------------------------------------------


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    ready = await api.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_report_outbox_backlog_and_requests(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    funded = await api.get("/metrics")
    assert funded.status_code == 200
    # The funding top-up's outbox row (no relay runs here).
    assert count_rows(write_engine)["outbox"] == 1
    assert _samples(funded.text)[("kessai_outbox_backlog", frozenset())] == 1

    for _ in range(3):
        await create_payment(api)
    await api.post(PAYMENTS, json=payment_body())  # 400: no key

    response = await api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    # Three balance payments: each its event and its wallet's debit.
    assert samples[("kessai_outbox_backlog", frozenset())] == 1 + 3 * 2

    def requests(status: str) -> float:
        labels = {"service": "command", "method": "POST", "route": PAYMENTS, "status": status}
        return samples[("kessai_http_requests_total", frozenset(labels.items()))]

    assert requests("201") == 3
    assert requests("400") == 1


async def test_unknown_route_is_404_in_the_error_format(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await api.post("/v1/payment", json=payment_body()), 404, "not_found")


async def test_wrong_method_is_405_in_the_error_format(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    funded = count_rows(write_engine)
    response = await api.delete(PAYMENTS, headers={"Idempotency-Key": new_key()})
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_error(await api.post("/healthz"), 405, "method_not_allowed")
    assert count_rows(write_engine) == funded
