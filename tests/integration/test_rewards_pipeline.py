"""The rewards service through the whole pipeline: payments and registrations recorded by the
command path, published by the relay, granted by a ``python -m rewards`` process that is
SIGKILLed mid-run and started again, the grants published back and projected into the users'
wallets and statements.

Every captured payment gets its cashback once, every registered user 500 yen once, every
refund takes back its share of the cashback once, and a second instance reading the whole topic
again (another consumer group) grants and takes back nothing more.
A broker restarted empty loses no grant of what is published after it, and doubles none. A
cashback spent before its payment's refund is owed, and a top-up through the command API pays
the debt off.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import orjson
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.relay import Relay
from command_service.routes.payments import capture_command
from command_service.schemas import CreatePayment
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.broker import ensure_topic
from kessai.campaigns import decide_create, parse_rules
from kessai.clock import utcnow
from kessai.events import PaymentCaptured, PaymentRefunded, RewardGranted, RewardTakenBack
from kessai.schema.read import wallet_movements
from kessai.schema.write import campaign_budget, reward_grants
from kessai.settings import Settings
from kessai.write_store import append_events, load_debts, load_granted
from projector.service import Projector
from rewards.service import Rewards
from tests.helpers import new_key, own_broker, payment_body, restart_on_same_port
from tests.integration.test_projector import count
from tests.integration.test_registrations import register, running
from tests.pipeline import (
    make_traffic,
    wait_until,
    wallets_match,
    write_store_events,
    write_store_wallet_events,
)
from tests.pipeline import running as running_components
from tests.rewards import grants_count, rewards_by_key, spawn_rewards, total

USERS = [f"joined-{n}" for n in range(20)]
PAYMENTS = 60


def create_campaigns(engine: Engine) -> None:
    now = utcnow()
    window = {
        "currency": "JPY",
        "budget": 10**9,
        "starts_at": (now - timedelta(days=1)).isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
    }
    cashback = {
        "campaign_id": "cashback-20",
        "name": "20% back",
        "kind": "cashback",
        "rate_bp": 2000,
        "cap_per_payment": 1000,
        "cap_per_user_month": 10**8,
        **window,
    }
    welcome = {"campaign_id": "welcome", "name": "500 yen", "kind": "welcome_bonus", **window}
    created = [decide_create(parse_rules(r), now=now, actor="admin") for r in (cashback, welcome)]
    with engine.begin() as conn:
        append_events(conn, created, shards=8)


def take_backs_count(engine: Engine) -> int:
    return count(engine, reward_grants, reward_grants.c.amount < 0)


def expected_take_backs(engine: Engine) -> dict[tuple[str, str], int]:
    """What each refund of a payment must take back of its cashback (``min(amount // 5,
    1000)``), by ``(payment id, refund id)``: its share of the proportion refunded so far,
    minus what the payment's earlier refunds took; refunds that round to nothing are left out."""
    due: dict[tuple[str, str], int] = {}
    by_payment: dict[uuid.UUID, list[PaymentCaptured | PaymentRefunded]] = {}
    for event in write_store_events(engine):
        by_payment.setdefault(event.payment_id, []).append(event)
    for payment_id, history in by_payment.items():
        captured, *refunds = history
        assert isinstance(captured, PaymentCaptured)
        granted = min(captured.payload.amount // 5, 1000)
        before = 0
        for refund in refunds:
            assert isinstance(refund, PaymentRefunded)
            now = granted * refund.payload.refunded_amount // captured.payload.amount
            if now > before:
                due[(str(payment_id), str(refund.payload.refund_id))] = now - before
            before = now
    return due


async def test_every_payment_and_registration_is_granted_once_through_a_sigkill(
    pipeline_settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    settings = pipeline_settings.model_copy(
        update={"rewards_group_id": f"kessai-rewards-{pipeline_settings.topic}"}
    )
    create_campaigns(write_engine)
    async with running(settings) as (_, api):
        for user in USERS:
            assert (await register(api, {"user_id": user})).status_code == 201
    await asyncio.to_thread(
        make_traffic,
        write_engine,
        payments_count=PAYMENTS,
        refund_share=0.3,
        second_refund_share=0.5,
    )
    captured = [e for e in write_store_events(write_engine) if isinstance(e, PaymentCaptured)]
    assert len(captured) == PAYMENTS
    expected = len(USERS) + PAYMENTS
    due = expected_take_backs(write_engine)
    assert due, "the traffic's refunds take nothing back: the test would prove nothing"

    relay = Relay(engine=write_engine, settings=settings)
    projector = Projector(engine=read_engine, settings=settings, registry=CollectorRegistry())
    async with running_components(relay, projector) as tasks:
        first = spawn_rewards(settings, tmp_path)
        processes.append(first)
        await wait_until(lambda: grants_count(write_engine) > 0, tasks=tasks)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        granted_before_the_kill = grants_count(write_engine)
        second = spawn_rewards(settings, tmp_path)
        processes.append(second)
        await wait_until(lambda: grants_count(write_engine) == expected, tasks=tasks)
        await wait_until(lambda: take_backs_count(write_engine) == len(due), tasks=tasks)
        await wait_until(lambda: wallets_match(write_engine, read_engine), tasks=tasks)
        again = await _read_again_by_a_second_instance(settings, write_engine, expected)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0

    assert 0 < granted_before_the_kill <= expected
    assert total(again, "kessai_rewards_grants_total") == 0
    assert total(again, "kessai_rewards_taken_back_minor_units_total") == 0
    granted = rewards_by_key(write_engine)
    assert set(granted.values()) == {1}
    assert {p for c, p in granted if c == "cashback-20"} == {str(e.payment_id) for e in captured}
    assert {u for c, u in granted if c == "welcome"} == set(USERS)
    cashback = {
        str(e.payload.payment_id): e.payload.amount
        for e in write_store_wallet_events(write_engine)
        if isinstance(e, RewardGranted) and e.payload.kind == "cashback"
    }
    assert cashback == {str(e.payment_id): min(e.payload.amount // 5, 1000) for e in captured}
    with write_engine.connect() as conn:
        totals = load_granted(conn, ["cashback-20", "welcome"])
        batches = conn.execute(sa.select(sa.func.sum(campaign_budget.c.grants))).scalar_one()
    taken = {
        (str(e.payload.payment_id), str(e.payload.refund_id)): e.payload.amount
        for e in write_store_wallet_events(write_engine)
        if isinstance(e, RewardTakenBack)
    }
    assert taken == due  # the payers' wallets hold plenty: nothing is owed
    assert totals["cashback-20"].amount == sum(cashback.values()) - sum(due.values())
    assert totals["welcome"].amount == 500 * len(USERS)
    assert batches == expected
    assert count(read_engine, wallet_movements, wallet_movements.c.kind == "reward") == expected
    takebacks = wallet_movements.c.kind == "reward_takeback"
    assert count(read_engine, wallet_movements, takebacks) == len(due)


async def _read_again_by_a_second_instance(
    settings: Settings, write_engine: Engine, expected: int
) -> CollectorRegistry:
    """A rewards instance of another consumer group reads the whole topic again: every grant
    it meets is skipped by its key. Returns its metrics."""
    registry = CollectorRegistry()
    other = settings.model_copy(update={"rewards_group_id": f"other-{uuid.uuid4().hex[:8]}"})
    instance = Rewards(engine=write_engine, settings=other, registry=registry)
    async with running_components(instance) as tasks:
        await wait_until(
            lambda: total(registry, "kessai_rewards_skipped_total") >= expected,
            tasks=tasks,
        )
    return registry


async def test_a_broker_restarted_empty_neither_loses_nor_doubles_a_grant(
    settings: Settings, write_engine: Engine, tmp_path: Path
) -> None:
    """The broker SIGKILLed after every grant of a first traffic, and a new, empty one started
    on its address (the topic created at once, as ``kessai up`` does): the payments written
    after it reach a new log whose offsets start again below the consumer's old positions, and
    each of them is granted; nothing of before is granted again."""
    with own_broker(tmp_path) as broker:
        settings = settings.model_copy(
            update={
                "kafka_bootstrap": broker.bootstrap,
                "kafka_request_timeout_ms": 1_000,
                "rewards_group_id": f"kessai-rewards-{settings.topic}",
                "rewards_batch_size": 20,
            }
        )
        create_campaigns(write_engine)
        await asyncio.to_thread(make_traffic, write_engine, payments_count=PAYMENTS, seed=21)
        instance = Rewards(engine=write_engine, settings=settings, registry=CollectorRegistry())
        relay = Relay(engine=write_engine, settings=settings)
        async with running_components(relay, instance) as tasks:
            await wait_until(lambda: grants_count(write_engine) == PAYMENTS, tasks=tasks)
            broker.kill()
            restart_on_same_port(broker)
            await ensure_topic(
                broker.bootstrap, settings.topic, partitions=settings.topic_partitions
            )
            await asyncio.to_thread(
                make_traffic, write_engine, payments_count=10, refund_share=0.0, seed=22
            )
            await wait_until(
                lambda: grants_count(write_engine) == PAYMENTS + 10, tasks=tasks, within=60
            )
    captured = [e for e in write_store_events(write_engine) if isinstance(e, PaymentCaptured)]
    granted = rewards_by_key(write_engine)
    assert set(granted.values()) == {1}
    assert set(granted) == {("cashback-20", str(e.payment_id)) for e in captured}


async def test_a_spent_cashback_is_owed_and_a_top_up_pays_it_off_through_the_pipeline(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    """Through the command API: a card payment of 3,000 earns 600 of cashback, a balance payment
    spends 500 of it, then the card payment is refunded in full: the wallet gives the 100 it
    holds and owes 500; a top-up of 1,000 pays the debt off. The statement shows each step,
    the campaign gets every yen of its 600 back, and the ledger check proves the postings."""
    settings = pipeline_settings.model_copy(
        update={"rewards_group_id": f"kessai-rewards-{pipeline_settings.topic}"}
    )
    now = utcnow()
    rules = {
        "campaign_id": "card-20",
        "name": "20% back on cards",
        "kind": "cashback",
        "currency": "JPY",
        "budget": 10**6,
        "starts_at": (now - timedelta(days=1)).isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
        "rate_bp": 2000,
        "cap_per_payment": 1000,
        "cap_per_user_month": 10**5,
        "methods": ["card"],
    }
    with write_engine.begin() as conn:
        created = decide_create(parse_rules(rules), now=now, actor="admin")
        append_events(conn, [created], shards=settings.outbox_shards)
    card = card_payment(write_engine, settings, "spender", 3_000)
    instance = Rewards(engine=write_engine, settings=settings, registry=CollectorRegistry())
    relay = Relay(engine=write_engine, settings=settings)
    projector = Projector(engine=read_engine, settings=settings, registry=CollectorRegistry())
    async with (
        running(settings, PAYMENTS_WRITE, WALLETS_WRITE) as (_, api),
        running_components(relay, instance, projector) as tasks,
    ):
        await wait_until(lambda: grants_count(write_engine) == 1, tasks=tasks)
        spent = await api.post(
            "/v1/payments",
            json=payment_body(user_id="spender", amount=500),
            headers={"Idempotency-Key": new_key()},
        )
        assert spent.status_code == 201, spent.text
        refunded = await api.post(
            f"/v1/payments/{card}/refunds",
            json={"amount": 3_000},
            headers={"Idempotency-Key": new_key()},
        )
        assert refunded.status_code == 201, refunded.text
        await wait_until(lambda: owed(write_engine, "spender") == 500, tasks=tasks)
        topped = await api.post(
            "/v1/users/spender/top-ups",
            json={"amount": 1_000, "source": "bank"},
            headers={"Idempotency-Key": new_key()},
        )
        assert topped.status_code == 201, topped.text
        await wait_until(lambda: owed(write_engine, "spender") == 0, tasks=tasks)
        await wait_until(lambda: wallets_match(write_engine, read_engine), tasks=tasks)
    with read_engine.connect() as conn:
        m = wallet_movements.c
        lines = conn.execute(
            sa.select(m.kind, m.amount, m.balance_after, m.campaign_id)
            .where(m.user_id == "spender")
            .order_by(m.version)
        ).all()
    assert [tuple(line) for line in lines] == [
        ("reward", 600, 600, "card-20"),
        ("payment", -500, 100, None),
        ("reward_takeback", -100, 0, "card-20"),
        ("top_up", 1_000, 1_000, None),
        ("reward_takeback", -500, 500, "card-20"),
    ]
    with write_engine.connect() as conn:
        assert load_granted(conn, ["card-20"])["card-20"].amount == 0


def card_payment(engine: Engine, settings: Settings, user_id: str, amount: int) -> uuid.UUID:
    """A card payment captured by the command API's write path (the acquirer's approval is
    another test's subject): it debits no wallet."""
    policy = handlers.WritePolicy(
        client_id="test",
        idempotency_key=new_key(),
        retention=timedelta(hours=1),
        shards=settings.outbox_shards,
        max_attempts=10,
    )
    body = payment_body(user_id=user_id, amount=amount, method="card")
    command = capture_command(
        policy=policy, command=CreatePayment.model_validate(body), device_id=None
    )
    outcome = handlers.record_alone(engine, command)
    assert outcome.status == 201
    return uuid.UUID(orjson.loads(outcome.body)["payment_id"])


def owed(engine: Engine, user_id: str) -> int:
    with engine.connect() as conn:
        return load_debts(conn, [user_id])[user_id].total
