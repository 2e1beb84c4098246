"""Refunds taking cashback back, and debts paid off, through the grant transaction
(``rewards/store.py``) on the real write stores (SQLite and MariaDB), with payments, refunds
and top-ups recorded by the command API's own write path: a refund takes back its share once
however often its batch comes, the wallet's balance, the budget's rows and the debts are exact,
a spent cashback is owed and later credits pay it off, and four transactions paying off one
user's debt at once pay it once. The ledger check (``tests/ledger_check.py``) proves the
postings of every test here sum to zero and each wallet ends where its postings add up to."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.payments import capture_command
from command_service.routes.refunds import refund_command
from command_service.schemas import CreatePayment, CreateRefund
from kessai.clock import utcnow
from kessai.debts import Debts
from kessai.events import PaymentRefunded, RewardTakenBack, parse_event, parse_wallet_event
from kessai.grants import payment_facts
from kessai.schema.write import events, outbox, reward_debts, wallet_events
from kessai.write_store import load_captured, load_debts, load_granted, load_wallets
from rewards.decide import Captured, Credited, Fact, Refunded
from rewards.store import commit_grants
from tests.helpers import fund, new_key, payment_body
from tests.integration.test_rewards_store import (
    SHARDS,
    budget_rows,
    create_campaign,
    grant,
    granted_rows,
)


def policy() -> handlers.WritePolicy:
    return handlers.WritePolicy(
        client_id="test",
        idempotency_key=new_key(),
        retention=timedelta(hours=1),
        shards=SHARDS,
        max_attempts=10,
    )


def pay(engine: Engine, amount: int, method: str = "balance", user_id: str = "u1") -> Captured:
    """A payment recorded by the command API's write path (a balance one debits the wallet),
    as the rewards service reads it off the topic."""
    body = payment_body(user_id=user_id, amount=amount, method=method, merchant_id="m1")
    command = capture_command(
        policy=policy(), command=CreatePayment.model_validate(body), device_id=None
    )
    outcome = handlers.record_alone(engine, command)
    assert outcome.status == 201
    payment_id = uuid.UUID(orjson.loads(outcome.body)["payment_id"])
    with engine.connect() as conn:
        event = load_captured(conn, [payment_id])[payment_id]
    return Captured(payment_facts(event), recorded_at=event.recorded_at)


def refund(engine: Engine, payment: Captured, amount: int) -> Refunded:
    """A refund recorded by the command API's write path (of a balance payment, it credits
    the wallet), as the rewards service reads it off the topic."""
    payment_id = payment.facts.payment_id
    command = refund_command(
        policy=policy(), payment_id=payment_id, command=CreateRefund(amount=amount)
    )
    assert handlers.record_alone(engine, command).status == 201
    with engine.connect() as conn:
        body = conn.execute(
            sa.select(events.c.body)
            .where(events.c.payment_id == payment_id)
            .order_by(events.c.version.desc())
            .limit(1)
        ).scalar_one()
    event = parse_event(body)
    assert isinstance(event, PaymentRefunded)
    p = event.payload
    return Refunded(payment_id, p.refund_id, p.refunded_amount, event.recorded_at)


def top_up(engine: Engine, amount: int, user_id: str = "u1") -> Credited:
    fund(engine, user_id, amount=amount)
    return Credited(user_id, utcnow())


def commit(engine: Engine, facts: list[Fact], attempts: int = 30) -> list[RewardTakenBack]:
    decision = commit_grants(engine, facts, shards=SHARDS, attempts=attempts)
    return [e for e in decision.wallet_events if isinstance(e, RewardTakenBack)]


def balance(engine: Engine, user_id: str = "u1") -> int:
    with engine.connect() as conn:
        return load_wallets(conn, [user_id])[user_id].balance


def debts(engine: Engine, user_id: str = "u1") -> Debts:
    with engine.connect() as conn:
        return load_debts(conn, [user_id])[user_id]


def granted(engine: Engine) -> int:
    with engine.connect() as conn:
        return load_granted(conn, ["autumn-20"])["autumn-20"].amount


def taken_back(engine: Engine, user_id: str = "u1") -> list[tuple[str, int, int, int]]:
    """``(kind, due, amount, owed)`` of each ``RewardTakenBack`` the wallet recorded."""
    w = wallet_events.c
    with engine.connect() as conn:
        bodies = conn.execute(
            sa.select(w.body)
            .where(w.user_id == user_id, w.event_type == "RewardTakenBack")
            .order_by(w.version)
        ).scalars()
        found = [parse_wallet_event(body) for body in bodies]
    return [
        (e.payload.kind, e.payload.due, e.payload.amount, e.payload.owed)
        for e in found
        if isinstance(e, RewardTakenBack)
    ]


def test_a_refund_takes_back_its_share_once_and_returns_it_to_the_budget(
    write_engine: Engine,
) -> None:
    """20% of a 3,000-yen balance payment is 600; refunding 1,500 of it puts the 1,500 back in
    the wallet and takes 300 back to the campaign, once, however often the batch comes."""
    fund(write_engine, "u1", amount=10_000)
    create_campaign(write_engine)
    payment = pay(write_engine, 3_000)
    assert grant(write_engine, [payment]) == [600]
    half = refund(write_engine, payment, 1_500)
    assert balance(write_engine) == 10_000 - 3_000 + 600 + 1_500
    assert [e.payload.amount for e in commit(write_engine, [half])] == [300]
    assert commit(write_engine, [half, payment]) == []  # redelivered: nothing twice
    assert balance(write_engine) == 10_000 - 3_000 + 600 + 1_500 - 300
    key = str(payment.facts.payment_id)
    assert [(r[3], r[4]) for r in granted_rows(write_engine)] == [
        (key, 600),
        (f"{key}/{half.refund_id}", -300),
    ]
    assert budget_rows(write_engine) == [(1, 600, 1, 600), (2, -300, 0, 300)]
    rest = refund(write_engine, payment, 1_500)
    assert [e.payload.amount for e in commit(write_engine, [rest, rest])] == [300]
    assert granted(write_engine) == 0
    assert sum(r[4] for r in granted_rows(write_engine)) == 0
    with write_engine.connect() as conn:
        published = conn.execute(
            sa.select(sa.func.count()).where(outbox.c.event_type == "RewardTakenBack")
        ).scalar_one()
    assert published == 2
    assert debts(write_engine).version == 0  # the wallet could pay: no debt ever


def test_a_spent_cashback_is_owed_and_later_credits_pay_it_off_oldest_first(
    write_engine: Engine,
) -> None:
    """A card payment's 600 of cashback, 500 of it spent: its refund (to the card) takes the
    100 left and records 500 owed; a top-up of 300 pays 300 of it, a redelivered credit with
    an empty wallet nothing, a top-up of 1,000 the last 200. The budget gets back only what
    came back, so it ends where the postings do: 600 granted, 600 back."""
    create_campaign(write_engine)
    card = pay(write_engine, 3_000, method="card")
    assert grant(write_engine, [card]) == [600]
    pay(write_engine, 500)  # the cashback spent
    full = refund(write_engine, card, 3_000)
    assert [
        (e.payload.due, e.payload.amount, e.payload.owed) for e in commit(write_engine, [full])
    ] == [(600, 100, 500)]
    assert balance(write_engine) == 0
    owed = debts(write_engine)
    assert (owed.version, owed.total, owed.currency) == (1, 500, "JPY")
    assert [(d.payment_id, d.refund_id) for d in owed.items] == [
        (card.facts.payment_id, full.refund_id)
    ]
    assert granted(write_engine) == 500
    assert granted_rows(write_engine)[-1][4] == -600  # the month's net grants: nothing left
    credit = top_up(write_engine, 300)
    assert [e.payload.amount for e in commit(write_engine, [credit])] == [300]
    assert commit(write_engine, [credit]) == []  # nothing left to pay from
    assert (balance(write_engine), debts(write_engine).total) == (0, 200)
    assert [e.payload.amount for e in commit(write_engine, [top_up(write_engine, 1_000)])] == [200]
    assert (balance(write_engine), debts(write_engine).total) == (800, 0)
    assert taken_back(write_engine) == [
        ("refund", 600, 100, 500),
        ("debt", 500, 300, 200),
        ("debt", 200, 200, 0),
    ]
    assert granted(write_engine) == 0
    d = reward_debts.c
    with write_engine.connect() as conn:
        chain = conn.execute(
            sa.select(d.version, d.owed_after).where(d.user_id == "u1").order_by(d.version)
        ).all()
    assert [tuple(r) for r in chain] == [(1, 500), (2, 200), (3, 0)]


def test_four_transactions_paying_off_one_debt_at_once_pay_it_once(write_engine: Engine) -> None:
    """A debt of 600 and a wallet topped up with 10,000: four batches crediting the user decide
    at once; they collide on the wallet's and the debt stream's next versions, and the debt is
    paid exactly once."""
    create_campaign(write_engine)
    card = pay(write_engine, 3_000, method="card")
    grant(write_engine, [card])
    pay(write_engine, 600)
    commit(write_engine, [refund(write_engine, card, 3_000)])
    assert debts(write_engine).total == 600
    credit = top_up(write_engine, 10_000)
    together = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            together.wait(timeout=30)
            commit(write_engine, [credit], attempts=50)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert taken_back(write_engine) == [("debt", 600, 600, 0)]
    assert (balance(write_engine), debts(write_engine).total) == (10_000 - 600, 0)
    assert granted(write_engine) == 0


def debt_row(version: int, owed_after: int) -> dict[str, object]:
    return {
        "user_id": "u1",
        "version": version,
        "owed_after": owed_after,
        "currency": "JPY",
        "body": "[]",
        "recorded_at": utcnow(),
    }


@pytest.mark.parametrize(
    "statement", ["UPDATE reward_debts SET owed_after = 0", "DELETE FROM reward_debts"]
)
def test_debts_are_append_only_and_never_below_zero(write_engine: Engine, statement: str) -> None:
    with write_engine.begin() as conn:
        conn.execute(reward_debts.insert(), [debt_row(1, 500)])
    with pytest.raises(sa.exc.DBAPIError) as refused, write_engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert "append-only" in str(refused.value.orig)
    with pytest.raises(sa.exc.DBAPIError), write_engine.begin() as conn:  # the CHECK
        conn.execute(reward_debts.insert(), [debt_row(2, -1)])
    with write_engine.connect() as conn:
        rows = conn.execute(sa.select(reward_debts.c.version, reward_debts.c.owed_after)).all()
    assert [tuple(r) for r in rows] == [(1, 500)]
