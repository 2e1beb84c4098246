"""The write store's wallet streams (``wallet_events``): a wallet's balance is its newest
movement, and the database itself refuses what the write path must never do: rewrite or remove
a movement, record two movements at one version, or leave a balance below zero."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.ids import new_id
from kessai.schema.write import wallet_events
from kessai.wallets import Movement, Wallet, apply_movement, debit, top_up

LIMIT = 1_000_000


def row(user_id: str, movement: Movement) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "version": movement.version,
        "event_id": new_id(),
        "event_type": movement.kind,
        "schema_version": 2,
        "currency": movement.currency,
        "amount": movement.amount,
        "balance_after": movement.balance_after,
        "recorded_at": utcnow(),
        "body": orjson.dumps(dataclasses.asdict(movement)).decode(),
    }


def funded_wallet(engine: Engine, user_id: str = "u1") -> Wallet:
    """A wallet topped up with 10,000 yen, then paid 2,500 from, as rows of the store."""
    wallet = Wallet.empty(user_id)
    steps: list[Callable[[Wallet], Movement]] = [
        lambda w: top_up(w, 10_000, "JPY", limit=LIMIT),
        lambda w: debit(w, 2_500, "JPY"),
    ]
    with engine.begin() as conn:
        for decide in steps:
            movement = decide(wallet)
            conn.execute(wallet_events.insert(), [row(user_id, movement)])
            wallet = apply_movement(wallet, movement)
    return wallet


def balance(engine: Engine, user_id: str) -> tuple[int, int] | None:
    """(version, balance) of the wallet's newest movement: one primary-key read."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(wallet_events.c.version, wallet_events.c.balance_after)
            .where(wallet_events.c.user_id == user_id)
            .order_by(wallet_events.c.version.desc())
            .limit(1)
        ).first()
    return None if found is None else (found[0], found[1])


def test_the_balance_is_the_newest_movement(write_engine: Engine) -> None:
    wallet = funded_wallet(write_engine)
    assert balance(write_engine, "u1") == (2, 7_500) == (wallet.version, wallet.balance)
    assert balance(write_engine, "someone-else") is None


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE wallet_events SET balance_after = 1000000",
        "UPDATE wallet_events SET amount = 0 WHERE version = 2",
        "DELETE FROM wallet_events",
        "DELETE FROM wallet_events WHERE version = 2",
    ],
)
def test_movements_are_never_rewritten_or_removed(write_engine: Engine, statement: str) -> None:
    funded_wallet(write_engine)
    with pytest.raises(sa.exc.DBAPIError) as refused, write_engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert "append-only" in str(refused.value.orig)
    assert balance(write_engine, "u1") == (2, 7_500)


def test_two_movements_at_one_version_collide(write_engine: Engine) -> None:
    """Two writers that decided against the same balance: the second insert is refused, so it
    decides again on the new balance instead of spending the same yen twice."""
    wallet = funded_wallet(write_engine)
    first, second = debit(wallet, 5_000, "JPY"), debit(wallet, 5_000, "JPY")
    with write_engine.begin() as conn:
        conn.execute(wallet_events.insert(), [row("u1", first)])
    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        conn.execute(wallet_events.insert(), [row("u1", second)])
    assert balance(write_engine, "u1") == (3, 2_500)


def test_the_database_refuses_a_negative_balance(write_engine: Engine) -> None:
    """Beneath the write path's check (kessai/wallets.py refuses to decide this): a movement
    leaving the wallet below zero is refused by the store itself."""
    funded_wallet(write_engine)
    overdraft = Movement("payment", 3, -10_000, "JPY", -2_500)
    with pytest.raises(sa.exc.DBAPIError) as refused, write_engine.begin() as conn:
        conn.execute(wallet_events.insert(), [row("u1", overdraft)])
    assert "ck_wallet_events_balance_after_not_negative" in str(refused.value.orig)
    assert balance(write_engine, "u1") == (2, 7_500)
