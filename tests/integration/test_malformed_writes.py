"""Malformed writes to the command API: each is refused with a stable code, names what is
wrong, and writes nothing.

Every test runs on SQLite and on MySQL/MariaDB (see ``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from kessai.settings import Settings
from tests.helpers import count_rows, new_key, payment_body
from tests.integration.command_api import (
    JSON,
    PAYMENTS,
    assert_error,
    create_payment,
    error_fields,
    json_body,
    refunds_path,
)


def _without(field: str) -> bytes:
    body = payment_body()
    del body[field]
    return json_body(body)


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
        json_body({}),
        JSON,
        422,
        "validation_error",
        {"merchant_id", "user_id", "amount", "method"},
        id="all-fields-missing",
    ),
    pytest.param(_without("amount"), JSON, 422, "validation_error", {"amount"}, id="no-amount"),
    pytest.param(_without("method"), JSON, 422, "validation_error", {"method"}, id="no-method"),
    pytest.param(
        json_body(payment_body(note="x")), JSON, 422, "validation_error", {"note"}, id="extra-field"
    ),
    pytest.param(
        json_body(payment_body(amount=0)), JSON, 422, "validation_error", {"amount"}, id="0"
    ),
    pytest.param(
        json_body(payment_body(amount=-1)), JSON, 422, "validation_error", {"amount"}, id="neg"
    ),
    pytest.param(
        json_body(payment_body(amount=10**12 + 1)),
        JSON,
        422,
        "validation_error",
        {"amount"},
        id="over-max",
    ),
    pytest.param(
        json_body(payment_body(amount=1.5)), JSON, 422, "validation_error", {"amount"}, id="float"
    ),
    pytest.param(
        json_body(payment_body(amount=100.0)),
        JSON,
        422,
        "validation_error",
        {"amount"},
        id="float-int",
    ),
    pytest.param(
        json_body(payment_body(amount="100")), JSON, 422, "validation_error", {"amount"}, id="str"
    ),
    pytest.param(
        json_body(payment_body(amount=True)), JSON, 422, "validation_error", {"amount"}, id="bool"
    ),
    pytest.param(
        json_body(payment_body(amount=10**30)),
        JSON,
        422,
        "validation_error",
        {"amount"},
        id="huge-int",
    ),
    pytest.param(
        json_body(payment_body(amount=None)),
        JSON,
        422,
        "validation_error",
        {"amount"},
        id="null-amount",
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
        json_body(payment_body(currency="XXX")),
        JSON,
        422,
        "validation_error",
        {"currency"},
        id="currency-unknown",
    ),
    pytest.param(
        json_body(payment_body(currency="jpy")),
        JSON,
        422,
        "validation_error",
        {"currency"},
        id="currency-lowercase",
    ),
    pytest.param(
        json_body(payment_body(method="cash")), JSON, 422, "validation_error", {"method"}, id="cash"
    ),
    pytest.param(
        json_body(payment_body(user_id="user 1")),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-space",
    ),
    pytest.param(
        json_body(payment_body(user_id="u" * 65)),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-65",
    ),
    pytest.param(
        json_body(payment_body(user_id="ユーザー")),
        JSON,
        422,
        "validation_error",
        {"user_id"},
        id="user-id-unicode",
    ),
    pytest.param(
        json_body(payment_body(merchant_id="")),
        JSON,
        422,
        "validation_error",
        {"merchant_id"},
        id="merchant-id-empty",
    ),
    pytest.param(
        json_body(payment_body(metadata={f"k{i}": "v" for i in range(21)})),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-21-pairs",
    ),
    pytest.param(
        json_body(payment_body(metadata=_BIG_METADATA)),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-over-2kb",
    ),
    pytest.param(
        json_body(payment_body(metadata={"k": 1})),
        JSON,
        422,
        "validation_error",
        {"metadata.k"},
        id="metadata-int-value",
    ),
    pytest.param(
        json_body(payment_body(metadata=["k", "v"])),
        JSON,
        422,
        "validation_error",
        {"metadata"},
        id="metadata-list",
    ),
    pytest.param(
        json_body(payment_body(store_id="store\n1")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-newline",
    ),
    pytest.param(
        json_body(payment_body(store_id="store\x001")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-nul",
    ),
    pytest.param(
        json_body(payment_body(store_id="store-1\n")),
        JSON,
        422,
        "validation_error",
        {"store_id"},
        id="store-id-trailing-newline",
    ),
    pytest.param(
        json_body(payment_body(metadata={"k\x01": "v"})),
        JSON,
        422,
        "validation_error",
        {"metadata.k\x01.[key]"},
        id="metadata-key-control-char",
    ),
    pytest.param(
        json_body(payment_body(order_ref="o\x7f")),
        JSON,
        422,
        "validation_error",
        {"order_ref"},
        id="order-ref-del",
    ),
    pytest.param(
        json_body(payment_body(metadata={"k": "v" * 70_000})),
        JSON,
        413,
        "payload_too_large",
        None,
        id="body-over-64kb",
    ),
    pytest.param(
        json_body(payment_body()),
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
    before = count_rows(write_engine)

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
    assert count_rows(write_engine) == before


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
