"""What the command API tests share: paths, the error format's check, payments and refunds
made over HTTP, and what a test's requests added to the write store."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy.engine import Engine

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
