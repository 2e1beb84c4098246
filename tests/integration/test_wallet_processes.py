"""Two command API processes writing the same wallets at once: whatever mix of top-ups,
payments and refunds arrives, and whichever process takes each, a wallet's balance is the fold
of the postings to it, never below zero, and every answer the clients got is in it.

A property test (hypothesis) through the real handlers: two uvicorn processes on one write
store, requests sent to both concurrently over HTTP.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.events import parse_event, parse_wallet_event
from kessai.postings import user_account
from kessai.schema.write import events, wallet_events
from kessai.settings import Settings
from tests.helpers import api_key, bearer, new_key, payment_body, served_command_api


@pytest.fixture
def two_processes(settings: Settings) -> Iterator[tuple[str, str]]:
    with served_command_api(settings) as first, served_command_api(settings) as second:
        yield first, second


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "top_up", "pay" or "refund" (of the n-th payment made so far, if any)
    amount: int
    process: int


OPS = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(["top_up", "pay", "pay", "refund"]),
        amount=st.integers(1, 3_000),
        process=st.integers(0, 1),
    ),
    min_size=1,
    max_size=24,
)


async def _send(client: httpx.AsyncClient, op: Op, user_id: str, paid: list[str]) -> httpx.Response:
    key = {"Idempotency-Key": new_key()}
    if op.kind == "top_up":
        body = {"amount": op.amount, "currency": "JPY", "source": "bank"}
        return await client.post(f"/v1/users/{user_id}/top-ups", json=body, headers=key)
    if op.kind == "pay" or not paid:
        body = payment_body(user_id=user_id, amount=op.amount)
        return await client.post("/v1/payments", json=body, headers=key)
    target = paid[op.amount % len(paid)]
    return await client.post(
        f"/v1/payments/{target}/refunds", json={"amount": op.amount}, headers=key
    )


async def _play(urls: tuple[str, str], key: str, user_id: str, ops: list[Op]) -> int:
    """Send ``ops`` in waves of four concurrent requests, each to its process; the balance the
    accepted answers add up to."""
    expected = 0
    paid: list[str] = []
    async with (
        httpx.AsyncClient(base_url=urls[0], headers=bearer(key), timeout=30) as first,
        httpx.AsyncClient(base_url=urls[1], headers=bearer(key), timeout=30) as second,
    ):
        clients = (first, second)
        for start in range(0, len(ops), 4):
            wave = ops[start : start + 4]
            answers = await asyncio.gather(
                *(_send(clients[op.process], op, user_id, paid) for op in wave)
            )
            for answer in answers:
                code = answer.json().get("error", {}).get("code") if answer.is_error else None
                assert answer.status_code == 201 or code in {
                    "insufficient_balance",
                    "refund_exceeds_captured",
                }, answer.text
                if answer.status_code != 201:
                    continue
                body = answer.json()
                if "top_up_id" in body or "refund_id" in body:  # into the wallet
                    expected += body["amount"]
                else:
                    expected -= body["amount"]
                    paid.append(body["payment_id"])
    return expected


def _wallet(engine: Engine, user_id: str) -> tuple[list[int], int]:
    """(each balance_after in version order, the sum of every posting to the user's account)."""
    account = user_account(user_id)
    with engine.connect() as conn:
        movements = [
            parse_wallet_event(body)
            for (body,) in conn.execute(
                sa.select(wallet_events.c.body)
                .where(wallet_events.c.user_id == user_id)
                .order_by(wallet_events.c.version)
            )
        ]
        bodies = conn.execute(sa.select(events.c.body)).scalars().all()
    posted = sum(p.amount for m in movements for p in (m.postings or ()) if p.account == account)
    for body in bodies:
        posted += sum(p.amount for p in parse_event(body).postings or () if p.account == account)
    return [m.payload.balance_after for m in movements], posted


@examples(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_two_processes_never_take_a_wallet_below_zero_nor_lose_an_answer(
    settings: Settings,
    write_engine: Engine,
    two_processes: tuple[str, str],
    ops: list[Op],
) -> None:
    key = api_key(settings, PAYMENTS_WRITE, WALLETS_WRITE)
    user_id = f"u-{uuid.uuid4().hex[:12]}"
    expected = asyncio.run(_play(two_processes, key, user_id, ops))
    balances, posted = _wallet(write_engine, user_id)
    assert all(balance >= 0 for balance in balances)
    assert (balances[-1] if balances else 0) == posted == expected
