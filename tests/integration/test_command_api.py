"""The command API's guarantees, over HTTP against the real app and real write stores.

Every test runs on SQLite and on MySQL/MariaDB (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

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
from kessai.schema.write import idempotency_keys
from kessai.settings import Settings
from tests.helpers import (
    api_key,
    bearer,
    count_rows,
    new_key,
    payment_body,
    stored_events,
    until_true,
)

PAYMENTS = "/v1/payments"


def refunds_path(payment_id: str) -> str:
    return f"/v1/payments/{payment_id}/refunds"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` in the error format with ``code``; returns ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["details"], dict)
    assert error["code"] == code, error
    assert "Traceback" not in response.text
    return error


def error_fields(error: dict[str, Any]) -> set[str]:
    return {item["field"] for item in error["details"]["errors"]}


async def create_payment(
    api: httpx.AsyncClient, key: str | None = None, **overrides: Any
) -> dict[str, Any]:
    response = await api.post(
        PAYMENTS, json=payment_body(**overrides), headers={"Idempotency-Key": key or new_key()}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def refund(
    api: httpx.AsyncClient, payment_id: str, amount: int, key: str | None = None
) -> httpx.Response:
    return await api.post(
        refunds_path(payment_id),
        json={"amount": amount},
        headers={"Idempotency-Key": key or new_key()},
    )


@pytest.fixture
async def app_and_api(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Like the ``api`` fixture, with the app itself at hand (its ``state``)."""
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


async def test_create_payment_records_one_event_one_outbox_row_one_key(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
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
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 1}
    assert stored_events(write_engine) == [(uuid.UUID(body["payment_id"]), 1)]


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
    key = new_key()
    first = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})
    second = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert second.status_code == first.status_code
    assert second.content == first.content
    assert second.headers["Idempotent-Replayed"] == "true"
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 1}


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
        content=_j(payment_body(metadata={"a": "1", "b": "2"})),
        headers={"Idempotency-Key": key, **JSON},
    )
    again = await api.post(
        PAYMENTS,
        content=_j(payment_body(metadata={"b": "2", "a": "1"})),
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
    upper = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": "Key-A"})
    lower = await api.post(
        PAYMENTS, json=payment_body(amount=7), headers={"Idempotency-Key": "key-a"}
    )

    assert upper.status_code == 201, upper.text
    assert lower.status_code == 201, lower.text  # not 422 idempotency_key_reused
    assert "Idempotent-Replayed" not in lower.headers
    assert upper.json()["payment_id"] != lower.json()["payment_id"]
    assert count_rows(write_engine) == {"events": 2, "outbox": 2, "idempotency_keys": 2}
    # and each still replays its own payment
    again = await api.post(
        PAYMENTS, json=payment_body(amount=7), headers={"Idempotency-Key": "key-a"}
    )
    assert again.content == lower.content


async def test_longest_allowed_key_is_stored_and_replayed(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    key = "K" * 254 + "~"
    first = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})
    again = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert first.status_code == 201, first.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    with write_engine.connect() as conn:
        stored = conn.execute(sa.select(idempotency_keys.c.idempotency_key)).scalar_one()
    assert stored == key


async def test_refused_request_does_not_consume_its_key(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    """A refusal is not recorded: the same key then works for a valid request."""
    key = new_key()
    missing = await refund(api, str(uuid.uuid4()), 100, key=key)
    assert_error(missing, 404, "payment_not_found")

    created = await api.post(PAYMENTS, json=payment_body(), headers={"Idempotency-Key": key})

    assert created.status_code == 201, created.text
    assert "Idempotent-Replayed" not in created.headers
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 1}


async def test_expired_key_is_forgotten(api: httpx.AsyncClient, write_engine: Engine) -> None:
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
    assert count_rows(write_engine) == {"events": 2, "outbox": 2, "idempotency_keys": 1}
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
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 1}


# --- refunds ---------------------------------------------------------------------------------


async def test_partial_then_full_refund(api: httpx.AsyncClient, write_engine: Engine) -> None:
    payment = await create_payment(api, amount=1000)
    pid = payment["payment_id"]

    partial = await api.post(
        refunds_path(pid),
        json={"amount": 300, "reason": "one item returned"},
        headers={"Idempotency-Key": new_key()},
    )
    assert partial.status_code == 201, partial.text
    body = partial.json()
    assert uuid.UUID(body["refund_id"]).version == 7
    assert body | {"refund_id": None, "created_at": None} == {
        "refund_id": None,
        "payment_id": pid,
        "amount": 300,
        "currency": "JPY",
        "refunded_amount": 300,
        "status": "partially_refunded",
        "reason": "one item returned",
        "version": 2,
        "created_at": None,
    }

    full = await refund(api, pid, 700)
    assert full.status_code == 201, full.text
    assert full.json()["status"] == "refunded"
    assert full.json()["refunded_amount"] == 1000
    assert full.json()["version"] == 3
    assert full.json()["reason"] is None
    assert sorted(stored_events(write_engine)) == [(uuid.UUID(pid), v) for v in (1, 2, 3)]
    assert count_rows(write_engine) == {"events": 3, "outbox": 3, "idempotency_keys": 3}


async def test_refund_in_a_payments_currency(api: httpx.AsyncClient) -> None:
    payment = await create_payment(api, amount=1999, currency="USD")
    response = await refund(api, payment["payment_id"], 999)
    assert response.status_code == 201, response.text
    assert response.json()["currency"] == "USD"
    assert response.json()["refunded_amount"] == 999


async def test_over_refund_is_refused_and_writes_nothing(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    payment = await create_payment(api, amount=1000)
    assert (await refund(api, payment["payment_id"], 600)).status_code == 201
    before = count_rows(write_engine)
    key = new_key()

    response = await refund(api, payment["payment_id"], 401, key=key)

    error = assert_error(response, 409, "refund_exceeds_captured")
    assert error["details"] == {"captured": 1000, "refunded": 600, "requested": 401}
    assert count_rows(write_engine) == before
    # Not recorded under its key: the same request is judged again, not replayed.
    again = await refund(api, payment["payment_id"], 401, key=key)
    assert_error(again, 409, "refund_exceeds_captured")
    assert "Idempotent-Replayed" not in again.headers
    exact = await refund(api, payment["payment_id"], 400)
    assert exact.status_code == 201
    assert exact.json()["status"] == "refunded"


async def test_refund_beyond_a_fully_refunded_payment_is_refused(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    payment = await create_payment(api, amount=5)
    assert (await refund(api, payment["payment_id"], 5)).status_code == 201
    before = count_rows(write_engine)

    error = assert_error(
        await refund(api, payment["payment_id"], 1), 409, "refund_exceeds_captured"
    )

    assert error["details"] == {"captured": 5, "refunded": 5, "requested": 1}
    assert count_rows(write_engine) == before


async def test_refund_of_unknown_payment_is_404(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    await create_payment(api)
    before = count_rows(write_engine)
    unknown = str(uuid.uuid4())

    error = assert_error(await refund(api, unknown, 1), 404, "payment_not_found")

    assert error["details"] == {"payment_id": unknown}
    assert count_rows(write_engine) == before


@pytest.mark.parametrize(
    "payment_id", ["not-a-uuid", "12345", "0190c0de-0000-7000-8000-00000000000g"]
)
async def test_malformed_payment_id_in_the_path_is_422(
    api: httpx.AsyncClient, write_engine: Engine, payment_id: str
) -> None:
    before = count_rows(write_engine)
    error = assert_error(await refund(api, payment_id, 1), 422, "validation_error")
    assert error_fields(error) == {"path.payment_id"}
    assert count_rows(write_engine) == before


async def test_refund_replay_is_idempotent(api: httpx.AsyncClient, write_engine: Engine) -> None:
    payment = await create_payment(api, amount=1000)
    key = new_key()
    first = await refund(api, payment["payment_id"], 250, key=key)
    second = await refund(api, payment["payment_id"], 250, key=key)

    assert first.status_code == 201
    assert second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert count_rows(write_engine)["events"] == 2
    # A different amount under that key is another request:
    other = await refund(api, payment["payment_id"], 251, key=key)
    assert assert_error(other, 422, "idempotency_key_reused")["details"] == {"fields": ["amount"]}
    # The same refund of another payment under that key, too:
    elsewhere = await create_payment(api)
    moved = await refund(api, elsewhere["payment_id"], 250, key=key)
    assert assert_error(moved, 422, "idempotency_key_reused")["details"] == {
        "fields": ["payment_id"]
    }
    assert count_rows(write_engine)["events"] == 3


async def test_concurrent_refunds_never_exceed_the_captured_amount(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    payment = await create_payment(api, amount=10)
    pid = payment["payment_id"]

    responses = await asyncio.gather(*(refund(api, pid, 1) for _ in range(50)))

    accepted = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code != 201]
    assert len(accepted) == 10, sorted({(r.status_code, r.text[:200]) for r in refused})
    assert len(refused) == 40
    for response in refused:
        error = assert_error(response, 409, "refund_exceeds_captured")
        assert error["details"]["captured"] == 10
        assert error["details"]["refunded"] == 10
    bodies = sorted((r.json() for r in accepted), key=lambda b: b["version"])
    assert [b["version"] for b in bodies] == list(range(2, 12))
    assert [b["refunded_amount"] for b in bodies] == list(range(1, 11))
    assert bodies[-1]["refunded_amount"] == 10
    assert bodies[-1]["status"] == "refunded"
    assert sorted(stored_events(write_engine)) == [(uuid.UUID(pid), v) for v in range(1, 12)]
    assert count_rows(write_engine) == {"events": 11, "outbox": 11, "idempotency_keys": 11}


# --- malformed input -------------------------------------------------------------------------


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _without(field: str) -> bytes:
    body = payment_body()
    del body[field]
    return _j(body)


JSON = {"content-type": "application/json"}
_BIG_METADATA = {f"k{i}": "v" * 500 for i in range(5)}  # each value fits, 2.5 KB in all
_DEEP = (
    b'{"merchant_id":"m","user_id":"u","amount":1,"method":"card","metadata":{"k":'
    + b"[" * 10_000
    + b"]" * 10_000
    + b"}}"
)

# (raw body, extra headers, status, code, offending fields)
MALFORMED_PAYMENTS = [
    pytest.param(b'{"merchant_id": ', JSON, 400, "malformed_json", None, id="invalid-json"),
    pytest.param(b"{'amount': 1}", JSON, 400, "malformed_json", None, id="single-quotes"),
    pytest.param(b"[]", JSON, 422, "validation_error", {"body"}, id="json-array"),
    pytest.param(b'"pay"', JSON, 422, "validation_error", {"body"}, id="json-string"),
    pytest.param(b"null", JSON, 422, "validation_error", {"body"}, id="json-null"),
    pytest.param(b"", JSON, 422, "validation_error", {"body"}, id="empty-body"),
    pytest.param(
        _j({}),
        JSON,
        422,
        "validation_error",
        {"merchant_id", "user_id", "amount", "method"},
        id="all-fields-missing",
    ),
    pytest.param(_without("amount"), JSON, 422, "validation_error", {"amount"}, id="no-amount"),
    pytest.param(_without("method"), JSON, 422, "validation_error", {"method"}, id="no-method"),
    pytest.param(
        _j(payment_body(note="x")), JSON, 422, "validation_error", {"note"}, id="extra-field"
    ),
    pytest.param(_j(payment_body(amount=0)), JSON, 422, "validation_error", {"amount"}, id="0"),
    pytest.param(_j(payment_body(amount=-1)), JSON, 422, "validation_error", {"amount"}, id="neg"),
    pytest.param(
        _j(payment_body(amount=10**12 + 1)),
        JSON,
        422,
        "validation_error",
        {"amount"},
        id="over-max",
    ),
    pytest.param(
        _j(payment_body(amount=1.5)), JSON, 422, "validation_error", {"amount"}, id="float"
    ),
    pytest.param(
        _j(payment_body(amount=100.0)), JSON, 422, "validation_error", {"amount"}, id="float-int"
    ),
    pytest.param(
        _j(payment_body(amount="100")), JSON, 422, "validation_error", {"amount"}, id="str"
    ),
    pytest.param(
        _j(payment_body(amount=True)), JSON, 422, "validation_error", {"amount"}, id="bool"
    ),
    pytest.param(
        _j(payment_body(amount=10**30)), JSON, 422, "validation_error", {"amount"}, id="huge-int"
    ),
    pytest.param(
        _j(payment_body(amount=None)), JSON, 422, "validation_error", {"amount"}, id="null-amount"
    ),
    pytest.param(
        b'{"merchant_id":"m","user_id":"u","method":"card","amount":' + b"9" * 5000 + b"}",
        JSON,
        400,
        "malformed_json",
        None,
        id="int-of-5000-digits",
    ),
    pytest.param(
        _j(payment_body(currency="XXX")),
        JSON,
        422,
        "validation_error",
        {"currency"},
        id="currency-unknown",
    ),
    pytest.param(
        _j(payment_body(currency="jpy")),
        JSON,
        422,
        "validation_error",
        {"currency"},
        id="currency-lowercase",
    ),
    pytest.param(
        _j(payment_body(method="cash")), JSON, 422, "validation_error", {"method"}, id="cash"
    ),
    pytest.param(
        _j(payment_body(user_id="user 1")),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-space",
    ),
    pytest.param(
        _j(payment_body(user_id="u" * 65)),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-65",
    ),
    pytest.param(
        _j(payment_body(user_id="ユーザー")),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-unicode",
    ),
    pytest.param(
        _j(payment_body(merchant_id="")),
        JSON,
        422,
        "validation_error",
        {"merchant_id"},
        id="merchant-id-empty",
    ),
    pytest.param(
        _j(payment_body(metadata={f"k{i}": "v" for i in range(21)})),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-21-pairs",
    ),
    pytest.param(
        _j(payment_body(metadata=_BIG_METADATA)),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-over-2kb",
    ),
    pytest.param(
        _j(payment_body(metadata={"k": 1})),
        JSON,
        422,
        "validation_error",
        {"metadata.k"},
        id="metadata-int-value",
    ),
    pytest.param(
        _j(payment_body(metadata=["k", "v"])),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-list",
    ),
    pytest.param(
        _j(payment_body(store_id="store\n1")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-newline",
    ),
    pytest.param(
        _j(payment_body(store_id="store\x001")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-nul",
    ),
    pytest.param(
        _j(payment_body(store_id="store-1\n")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-trailing-newline",
    ),
    pytest.param(
        _j(payment_body(metadata={"k\x01": "v"})),
        JSON,
        422,
        "validation_error",
        {"metadata.k\x01.[key]"},
        id="metadata-key-control-char",
    ),
    pytest.param(
        _j(payment_body(order_ref="o\x7f")),
        JSON,
        422,
        "validation_error",
        {"order_ref"},
        id="order-ref-del",
    ),
    pytest.param(
        _j(payment_body(metadata={"k": "v" * 70_000})),
        JSON,
        413,
        "payload_too_large",
        None,
        id="body-over-64kb",
    ),
    pytest.param(
        _j(payment_body()),
        {"content-type": "text/plain"},
        422,
        "validation_error",
        {"body"},
        id="text-plain",
    ),
    pytest.param(_DEEP, JSON, 400, "malformed_json", None, id="nested-10000-levels"),
]


@pytest.mark.parametrize(("content", "headers", "status", "code", "fields"), MALFORMED_PAYMENTS)
async def test_malformed_payment_is_refused_and_writes_nothing(
    api: httpx.AsyncClient,
    write_engine: Engine,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
    fields: set[str] | None,
) -> None:
    before = count_rows(write_engine)

    response = await api.post(
        PAYMENTS, content=content, headers={"Idempotency-Key": new_key(), **headers}
    )

    error = assert_error(response, status, code)
    if fields is not None:
        assert error_fields(error) == fields
        assert all(item["message"] for item in error["details"]["errors"])
    assert count_rows(write_engine) == before


async def test_streamed_body_over_the_limit_is_413(
    api: httpx.AsyncClient, write_engine: Engine, settings: Settings
) -> None:
    """No Content-Length (a chunked upload): the limit counts the bytes as they arrive."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"merchant_id":"m","user_id":"u","amount":1,"method":"card","metadata":{"k":"'
        for _ in range(settings.max_body_bytes // 1000 + 1):
            yield b"v" * 1000
        yield b'"}}'

    response = await api.post(
        PAYMENTS,
        content=chunks(),
        headers={"Idempotency-Key": new_key(), "content-type": "application/json"},
    )

    error = assert_error(response, 413, "payload_too_large")
    assert error["details"] == {"max_bytes": settings.max_body_bytes}
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}


# (Idempotency-Key / X-Device-Id headers, status, code)
BAD_HEADERS = [
    pytest.param({}, 400, "idempotency_key_missing", id="no-key"),
    pytest.param({"Idempotency-Key": ""}, 400, "idempotency_key_invalid", id="empty-key"),
    pytest.param({"Idempotency-Key": "k" * 256}, 400, "idempotency_key_invalid", id="key-256"),
    pytest.param({"Idempotency-Key": "my key"}, 400, "idempotency_key_invalid", id="key-space"),
    pytest.param(
        {"Idempotency-Key": "キー".encode()}, 400, "idempotency_key_invalid", id="key-non-ascii"
    ),
    pytest.param(
        {"Idempotency-Key": "key\tx"}, 400, "idempotency_key_invalid", id="key-control-char"
    ),
    pytest.param(
        {"Idempotency-Key": "ok-key", "X-Device-Id": "pos 1"},
        400,
        "device_id_invalid",
        id="device-id-space",
    ),
]


@pytest.mark.parametrize(("headers", "status", "code"), BAD_HEADERS)
async def test_bad_headers_are_refused_and_write_nothing(
    api: httpx.AsyncClient,
    write_engine: Engine,
    headers: dict[str, str | bytes],
    status: int,
    code: str,
) -> None:
    before = count_rows(write_engine)
    raw = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
    response = await api.post(PAYMENTS, json=payment_body(), headers=raw)
    assert_error(response, status, code)
    assert count_rows(write_engine) == before


async def test_refund_without_key_is_refused(api: httpx.AsyncClient, write_engine: Engine) -> None:
    payment = await create_payment(api)
    before = count_rows(write_engine)
    response = await api.post(refunds_path(payment["payment_id"]), json={"amount": 1})
    assert_error(response, 400, "idempotency_key_missing")
    assert count_rows(write_engine) == before


MALFORMED_REFUNDS = [
    pytest.param({"amount": 0}, {"amount"}, id="zero"),
    pytest.param({"amount": -5}, {"amount"}, id="negative"),
    pytest.param({"amount": 1.5}, {"amount"}, id="float"),
    pytest.param({"amount": "5"}, {"amount"}, id="string"),
    pytest.param({"amount": 10**12 + 1}, {"amount"}, id="over-max"),
    pytest.param({}, {"amount"}, id="missing"),
    pytest.param({"amount": 5, "currency": "JPY"}, {"currency"}, id="extra-field"),
    pytest.param({"amount": 5, "reason": ""}, {"reason"}, id="empty-reason"),
    pytest.param({"amount": 5, "reason": "a\x1bb"}, {"reason"}, id="reason-control-char"),
    pytest.param({"amount": 5, "reason": "r" * 501}, {"reason"}, id="reason-501"),
]


@pytest.mark.parametrize(("body", "fields"), MALFORMED_REFUNDS)
async def test_malformed_refund_is_refused_and_writes_nothing(
    api: httpx.AsyncClient, write_engine: Engine, body: dict[str, Any], fields: set[str]
) -> None:
    payment = await create_payment(api, amount=100)
    before = count_rows(write_engine)

    response = await api.post(
        refunds_path(payment["payment_id"]), json=body, headers={"Idempotency-Key": new_key()}
    )

    error = assert_error(response, 422, "validation_error")
    assert error_fields(error) == fields
    assert count_rows(write_engine) == before


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


async def test_metrics_report_outbox_backlog_and_requests(api: httpx.AsyncClient) -> None:
    empty = await api.get("/metrics")
    assert empty.status_code == 200
    assert _samples(empty.text)[("kessai_outbox_backlog", frozenset())] == 0

    for _ in range(3):
        await create_payment(api)
    await api.post(PAYMENTS, json=payment_body())  # 400: no key

    response = await api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("kessai_outbox_backlog", frozenset())] == 3

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
    response = await api.delete(PAYMENTS, headers={"Idempotency-Key": new_key()})
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_error(await api.post("/healthz"), 405, "method_not_allowed")
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}
