"""Refunds over HTTP against the real app and real write stores: partial and full, refused
beyond what was captured (also under concurrent refunds), replayed, never recorded twice.

Every test runs on SQLite and on MySQL/MariaDB (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy.engine import Engine

from kessai.settings import Settings
from tests.helpers import count_rows, fund, new_key, stored_events
from tests.integration.command_api import (
    assert_error,
    create_payment,
    error_fields,
    refund,
    refunds_path,
    rows_added,
)


async def test_partial_then_full_refund(api: httpx.AsyncClient, write_engine: Engine) -> None:
    funded = count_rows(write_engine)
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
    # Each event queued with its wallet's: the payment's debit, the refunds' credits.
    assert rows_added(write_engine, funded) == {"events": 3, "outbox": 6, "idempotency_keys": 3}


async def test_refund_in_a_payments_currency(api: httpx.AsyncClient, settings: Settings) -> None:
    # A wallet holds one currency: a dollar payment needs a payer whose wallet holds dollars.
    fund(settings, "dollar-payer", currency="USD")
    payment = await create_payment(api, amount=1999, currency="USD", user_id="dollar-payer")
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
    funded = count_rows(write_engine)
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
    # Each event queued with its wallet's: the payment's debit, the ten refunds' credits.
    assert rows_added(write_engine, funded) == {"events": 11, "outbox": 22, "idempotency_keys": 11}
