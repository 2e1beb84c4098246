"""Wallets through the command API: a balance payment takes money out of the payer's wallet in
the transaction that records it, never more than the wallet holds, under any concurrency; a
refund puts it back; a top-up puts money in, up to the wallet's limit. A refusal writes nothing.

Every test runs on SQLite and on MySQL/MariaDB with the real app and the real write store (and
``tests/ledger_check.py`` checks the ledger and each wallet's chain when the test ends).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.schema.write import wallet_events
from kessai.settings import Settings
from tests.helpers import api_key, bearer, count_rows, new_key, payment_body
from tests.integration.command_api import PAYMENTS, assert_error, refunds_path


def top_ups_path(user_id: str) -> str:
    return f"/v1/users/{user_id}/top-ups"


@contextlib.asynccontextmanager
async def running(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The command API in process, with a key that may pay and top up."""
    app = create_app(settings.model_copy(update=overrides))
    key = api_key(settings, PAYMENTS_WRITE, WALLETS_WRITE)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(key),
        ) as client,
    ):
        yield client


async def top_up(
    api: httpx.AsyncClient, user_id: str, amount: Any, key: str | None = None, **fields: Any
) -> httpx.Response:
    body = {"amount": amount, "currency": "JPY", "source": "bank", **fields}
    return await api.post(
        top_ups_path(user_id), json=body, headers={"Idempotency-Key": key or new_key()}
    )


async def pay(api: httpx.AsyncClient, user_id: str, amount: int, **fields: Any) -> httpx.Response:
    return await api.post(
        PAYMENTS,
        json=payment_body(user_id=user_id, amount=amount, **fields),
        headers={"Idempotency-Key": new_key()},
    )


def wallet_history(engine: Engine, user_id: str) -> list[tuple[int, int, int]]:
    """(version, amount, balance_after) of each of the wallet's movements in the store."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                wallet_events.c.version, wallet_events.c.amount, wallet_events.c.balance_after
            )
            .where(wallet_events.c.user_id == user_id)
            .order_by(wallet_events.c.version)
        )
        return [(r[0], r[1], r[2]) for r in rows]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "one-by-one"])
async def test_200_payments_of_100_yen_from_10000_yen_exactly_100_succeed(
    settings: Settings, write_engine: Engine, group_commit: bool
) -> None:
    async with running(settings, group_commit=group_commit) as api:
        funded = await top_up(api, "payer", 10_000)
        assert funded.status_code == 201, funded.text
        answers = await asyncio.gather(*(pay(api, "payer", 100) for _ in range(200)))

    statuses = Counter(a.status_code for a in answers)
    assert statuses == {201: 100, 402: 100}, statuses
    for refused in (a for a in answers if a.status_code == 402):
        error = assert_error(refused, 402, "insufficient_balance")
        assert error["details"] == {
            "balance": 0,
            "requested": 100,
            "shortfall": 100,
            "currency": "JPY",
        }
    history = wallet_history(write_engine, "payer")
    assert [version for version, _, _ in history] == list(range(1, 102))
    assert history[-1][2] == 0
    assert min(balance for _, _, balance in history) == 0
    assert sum(amount for _, amount, _ in history) == 0
    # A refused payment writes nothing: one payment event per accepted payment.
    assert count_rows(write_engine)["events"] == 100


async def test_the_shortfall_says_what_is_missing_and_nothing_is_written(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as api:
        assert (await top_up(api, "u1", 700)).status_code == 201
        before = count_rows(write_engine)
        key = new_key()
        body = payment_body(user_id="u1", amount=1000)
        refused = await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})
        error = assert_error(refused, 402, "insufficient_balance")
        assert error["details"] == {
            "balance": 700,
            "requested": 1000,
            "shortfall": 300,
            "currency": "JPY",
        }
        assert count_rows(write_engine) == before
        # The key was not spent: once topped up, the same request with the same key succeeds.
        assert (await top_up(api, "u1", 300)).status_code == 201
        paid = await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})
        assert paid.status_code == 201, paid.text
        replay = await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})
        assert replay.headers["Idempotent-Replayed"] == "true"
    assert wallet_history(write_engine, "u1") == [(1, 700, 700), (2, 300, 1000), (3, -1000, 0)]


async def test_a_user_who_never_topped_up_has_a_balance_of_zero(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as api:
        refused = await pay(api, "nobody-yet", 1)
    error = assert_error(refused, 402, "insufficient_balance")
    assert error["details"] == {"balance": 0, "requested": 1, "shortfall": 1, "currency": "JPY"}
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}


async def test_card_payments_leave_the_wallet_alone(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as api:
        assert (await top_up(api, "u1", 500)).status_code == 201
        card = await pay(api, "u1", 1000, method="card")
    assert_error(card, 503, "acquirer_unavailable")  # no acquirer here: nothing captured
    assert wallet_history(write_engine, "u1") == [(1, 500, 500)]


async def test_a_refund_puts_the_money_back_even_past_the_limit(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, wallet_max_balance=1_000) as api:
        assert (await top_up(api, "u1", 1_000)).status_code == 201
        paid = (await pay(api, "u1", 600)).json()
        assert (await top_up(api, "u1", 600)).status_code == 201  # back at the limit
        refund = await api.post(
            refunds_path(paid["payment_id"]),
            json={"amount": 400},
            headers={"Idempotency-Key": new_key()},
        )
        assert refund.status_code == 201, refund.text
        over = await top_up(api, "u1", 1)
    error = assert_error(over, 409, "balance_limit_exceeded")
    assert error["details"] == {
        "balance": 1_400,
        "requested": 1,
        "limit": 1_000,
        "headroom": 0,
        "currency": "JPY",
    }
    assert wallet_history(write_engine, "u1") == [
        (1, 1_000, 1_000),
        (2, -600, 400),
        (3, 600, 1_000),
        (4, 400, 1_400),
    ]


async def test_a_top_up_answers_with_the_balance_and_replays(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as api:
        key = new_key()
        first = await top_up(api, "u1", 2_500, key=key, source="convenience_store", reference="R-1")
        again = await top_up(api, "u1", 2_500, key=key, source="convenience_store", reference="R-1")
        other = await top_up(api, "u1", 2_501, key=key, source="convenience_store", reference="R-1")
    assert first.status_code == 201, first.text
    body = first.json()
    assert {k: body[k] for k in ("user_id", "amount", "currency", "source", "reference")} == {
        "user_id": "u1",
        "amount": 2_500,
        "currency": "JPY",
        "source": "convenience_store",
        "reference": "R-1",
    }
    assert (body["balance"], body["version"]) == (2_500, 1)
    assert again.json() == body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_error(other, 422, "idempotency_key_reused")
    assert wallet_history(write_engine, "u1") == [(1, 2_500, 2_500)]


async def test_one_wallet_one_currency(settings: Settings, write_engine: Engine) -> None:
    async with running(settings) as api:
        assert (await top_up(api, "u1", 1_000)).status_code == 201
        in_dollars = await top_up(api, "u1", 1_000, currency="USD")
        paid_in_dollars = await pay(api, "u1", 100, currency="USD")
    for refused in (in_dollars, paid_in_dollars):
        error = assert_error(refused, 422, "currency_mismatch")
        assert error["details"] == {"wallet_currency": "JPY", "requested_currency": "USD"}
    assert wallet_history(write_engine, "u1") == [(1, 1_000, 1_000)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", -100),
        ("amount", 0),
        ("amount", 100.5),
        ("amount", 100.0),
        ("amount", "100"),
        ("amount", 10**12 + 1),
        ("source", "gift_card"),
        ("source", ""),
        ("currency", "XXX"),
        ("currency", "jpy"),
        ("reference", "\u3042"),
        ("reference", ""),
        ("unknown", 1),
    ],
)
async def test_bad_top_ups_are_refused_and_write_nothing(
    settings: Settings, write_engine: Engine, field: str, value: Any
) -> None:
    async with running(settings) as api:
        body = {"amount": 100, "currency": "JPY", "source": "bank", field: value}
        refused = await api.post(
            top_ups_path("u1"), json=body, headers={"Idempotency-Key": new_key()}
        )
    error = assert_error(refused, 422, "validation_error")
    assert field in {item["field"].split(".")[-1] for item in error["details"]["errors"]}
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}
    assert wallet_history(write_engine, "u1") == []


async def test_over_the_limit_is_refused_and_writes_nothing(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, wallet_max_balance=5_000) as api:
        refused = await top_up(api, "u1", 5_001)
    error = assert_error(refused, 409, "balance_limit_exceeded")
    assert error["details"]["headroom"] == 5_000
    assert wallet_history(write_engine, "u1") == []


async def test_a_top_up_needs_the_wallets_scope_and_a_valid_user(settings: Settings) -> None:
    app = create_app(settings)
    payments_only = bearer(api_key(settings, PAYMENTS_WRITE))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://command.test"
        ) as client,
    ):
        body = {"amount": 100, "currency": "JPY", "source": "bank"}
        forbidden = await client.post(
            top_ups_path("u1"), json=body, headers={**payments_only, "Idempotency-Key": "k1"}
        )
        assert_error(forbidden, 403, "forbidden")
        wallets = bearer(api_key(settings, WALLETS_WRITE))
        bad_user = await client.post(
            top_ups_path("a b"), json=body, headers={**wallets, "Idempotency-Key": "k2"}
        )
        assert_error(bad_user, 422, "validation_error")
        no_key = await client.post(top_ups_path("u1"), json=body, headers=wallets)
        assert_error(no_key, 400, "idempotency_key_missing")
