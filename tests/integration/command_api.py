"""What the command API tests share: paths, the error format's check, payments and refunds
made over HTTP, what a test's requests added to the write store, and another process's refund."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.refunds import refund_command
from command_service.schemas import CreateRefund
from command_service.store import load_wallets
from kessai.clock import utcnow
from kessai.ids import new_id
from kessai.ledger import fold
from tests.helpers import count_rows, new_key, payment_body

PAYMENTS = "/v1/payments"
JSON = {"content-type": "application/json"}


def rows_added(engine: Engine, since: dict[str, int]) -> dict[str, int]:
    """How many rows each write-store table (``count_rows``) gained since the baseline
    ``since``, a ``count_rows`` taken once the test's payers were funded: a top-up leaves an
    outbox row and a key of its own, which are not the test's requests' doing.

    An accepted balance payment adds one event, two outbox rows (the payment's, and its
    wallet's ``WalletDebited``) and one key; so does a refund of one (``WalletCredited``)."""
    now = count_rows(engine)
    return {table: now[table] - since[table] for table in now}


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode()


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


def refund_from_elsewhere(
    conn: sa.Connection, payment_id: uuid.UUID, amount: int = 1
) -> list[handlers.Event]:
    """The events another process's refund of ``amount`` appends (``handlers.append_events``),
    decided as the write path decides it (``refund_command``) on the state ``conn`` sees of the
    payment and of its payer's wallet: the refund at the payment's next version and, for a
    balance payment, the wallet's ``WalletCredited`` at the wallet's next version."""
    policy = handlers.WritePolicy(
        client_id="elsewhere",
        idempotency_key=new_key(),
        retention=timedelta(days=1),
        shards=1,
        max_attempts=1,
    )
    command = refund_command(
        policy=policy, payment_id=payment_id, command=CreateRefund(amount=amount)
    )
    state = fold(handlers.load_events_of_payments(conn, {payment_id})[payment_id])
    assert state is not None
    user_id = command.wallet_of(state)
    wallet = None if user_id is None else load_wallets(conn, {user_id})[user_id]
    _status, _body, events = command.decide(state, wallet, clock=utcnow, ids=new_id)
    return events
