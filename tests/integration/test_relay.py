"""The relay publishes the outbox to the real broker: key, headers, value, order, no loss."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    TopUpReceived,
    WalletCredited,
    WalletDebited,
    parse_event,
    parse_wallet_event,
    wallet_stream_id,
)
from kessai.postings import capture_postings, refund_postings
from kessai.settings import Settings
from tests.helpers import (
    FUNDS,
    PAYER,
    consume_all,
    count_rows,
    eventually,
    new_key,
    payment_body,
)


async def run_relay_until_drained(relay: Relay, engine: Engine, within: float = 30.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))

    async def drained() -> bool:
        if task.done():
            task.result()  # surface a crash
        return count_rows(engine)["outbox"] == 0

    try:
        await eventually(drained, within=within)
    finally:
        stop.set()
        await task


async def test_published_event_carries_key_headers_and_envelope(
    api: httpx.AsyncClient, settings: Settings, write_engine: Engine
) -> None:
    created = await api.post(
        "/v1/payments", json=payment_body(amount=500), headers={"Idempotency-Key": new_key()}
    )
    assert created.status_code == 201
    payment_id = created.json()["payment_id"]
    refund = await api.post(
        f"/v1/payments/{payment_id}/refunds",
        json={"amount": 200, "reason": "damaged"},
        headers={"Idempotency-Key": new_key()},
    )
    assert refund.status_code == 201

    await run_relay_until_drained(Relay(engine=write_engine, settings=settings), write_engine)

    # The payer's wallet moved too: its top-up (the ``api`` fixture's), the debit and the
    # credit are published on the same topic, keyed by the wallet's stream.
    wallet_key = str(wallet_stream_id(PAYER)).encode()
    records = await consume_all(settings.resolved_kafka_bootstrap(), settings.topic, at_least=5)
    assert len(records) == 5
    assert {r.key for r in records} == {payment_id.encode(), wallet_key}
    of_payment = [r for r in records if r.key == payment_id.encode()]
    of_wallet = sorted((r for r in records if r.key == wallet_key), key=lambda r: r.offset)
    assert len(of_payment) == 2
    assert len({r.partition for r in of_payment}) == 1
    assert len({r.partition for r in of_wallet}) == 1
    movements = [parse_wallet_event(r.value) for r in of_wallet]
    assert [type(m) for m in movements] == [TopUpReceived, WalletDebited, WalletCredited]
    assert [m.version for m in movements] == [1, 2, 3]
    debit, credit = movements[1], movements[2]
    assert isinstance(debit, WalletDebited)
    assert isinstance(credit, WalletCredited)
    assert (debit.payload.payment_id, debit.payload.amount, debit.payload.balance_after) == (
        uuid.UUID(payment_id),
        500,
        FUNDS - 500,
    )
    assert (credit.payload.payment_id, credit.payload.amount, credit.payload.balance_after) == (
        uuid.UUID(payment_id),
        200,
        FUNDS - 300,
    )
    assert [dict(r.headers)["event_type"] for r in of_wallet] == [
        b"TopUpReceived",
        b"WalletDebited",
        b"WalletCredited",
    ]
    first, second = sorted(of_payment, key=lambda r: r.offset)
    captured, refunded = parse_event(first.value), parse_event(second.value)
    assert isinstance(captured, PaymentCaptured)
    assert isinstance(refunded, PaymentRefunded)
    assert (captured.version, refunded.version) == (1, 2)
    assert captured.payment_id == uuid.UUID(payment_id)
    assert captured.payload.amount == 500
    assert refunded.payload.amount == 200
    assert refunded.payload.refunded_amount == 200
    # Schema version 2: each event carries how it moves money (kessai/postings.py).
    assert captured.postings == capture_postings("balance", "user-1", "merchant-1", 500)
    assert refunded.postings == refund_postings("balance", "user-1", "merchant-1", 200)
    headers = dict(first.headers)
    assert headers == {
        "event_type": b"PaymentCaptured",
        "schema_version": b"2",
        "event_id": str(captured.event_id).encode(),
    }
    assert dict(second.headers)["event_type"] == b"PaymentRefunded"
