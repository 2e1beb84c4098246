"""Wallet events through the real broker into the real read database (SQLite and MySQL),
published on the payments' topic as the relay publishes them.

Each test compares the read side's wallets and statements with the fold of the events
published (``kessai.wallets``), exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from kessai.events import kafka_headers, kafka_key, wallet_stream_id
from kessai.ids import new_id
from kessai.schema.read import dead_letters, parked_events, payments, wallet_movements, wallets
from kessai.settings import Settings
from kessai.wallets import fold_wallet, movement_of
from projector.service import Projector
from tests.integration.test_projector import count, metric
from tests.pipeline import produce, running, wait_until
from tests.unit.test_projector_apply import captured
from tests.wallet_streams import AnyEvent, Step, WalletEvent, record_parts, wallet_history

Statement = list[tuple[int, str, int, str, int]]
"""(version, kind, signed amount, currency, balance_after), oldest first."""
ReadWallets = tuple[dict[str, tuple[str, int, int]], dict[str, Statement]]
"""Each user's (currency, balance, version), and statement."""


def random_steps(rng: random.Random) -> list[Step]:
    """A wallet's life: a top-up first, then payments it covers, refunds of the last payment
    (never more than it took) and more top-ups."""
    steps: list[Step] = [("top_up", rng.randrange(1_000, 20_000))]
    balance, refundable = steps[0][1], 0
    for _ in range(rng.randrange(2, 9)):
        choice = rng.random()
        if choice < 0.5 and balance > 0:
            amount = rng.randrange(1, balance + 1)
            steps.append(("payment", amount))
            balance, refundable = balance - amount, amount
        elif choice < 0.75 and refundable > 0:
            amount = rng.randrange(1, refundable + 1)
            steps.append(("refund", amount))
            balance, refundable = balance + amount, refundable - amount
        else:
            amount = rng.randrange(100, 5_000)
            steps.append(("top_up", amount))
            balance += amount
    return steps


def expected(histories: Sequence[Sequence[WalletEvent]]) -> ReadWallets:
    balances: dict[str, tuple[str, int, int]] = {}
    statements: dict[str, Statement] = {}
    for history in histories:
        user = history[0].user_id
        wallet = fold_wallet(user, [movement_of(e) for e in history])
        assert wallet.currency is not None
        balances[user] = (wallet.currency, wallet.balance, wallet.version)
        statements[user] = [
            (e.version, movement_of(e).kind, movement_of(e).amount, e.payload.currency,
             e.payload.balance_after)
            for e in history
        ]  # fmt: skip
    return balances, statements


def read_wallets(engine: Engine) -> ReadWallets:
    with engine.connect() as conn:
        balances = {
            r.user_id: (r.currency, int(r.balance), int(r.version))
            for r in conn.execute(sa.select(wallets))
        }
        statements: dict[str, Statement] = {}
        for m in conn.execute(
            sa.select(wallet_movements).order_by(
                wallet_movements.c.user_id, wallet_movements.c.version
            )
        ):
            statements.setdefault(m.user_id, []).append(
                (int(m.version), m.kind, int(m.amount), m.currency, int(m.balance_after))
            )
    return balances, statements


def interleaved(histories: Sequence[Sequence[AnyEvent]], rng: random.Random) -> list[AnyEvent]:
    """Every stream's events in its own order, the streams shuffled together."""
    queues = [list(h) for h in histories if h]
    merged: list[AnyEvent] = []
    while queues:
        queue = rng.choice(queues)
        merged.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return merged


async def test_wallet_events_are_applied_beside_payments_and_redelivery_changes_nothing(
    pipeline_settings: Settings, read_engine: Engine
) -> None:
    rng = random.Random(13)
    histories = [wallet_history(f"u{i}", random_steps(rng)) for i in range(40)]
    payment_events = [[captured(new_id())] for _ in range(30)]
    published = interleaved([*histories, *payment_events], rng)
    registry = CollectorRegistry()
    projector = Projector(engine=read_engine, settings=pipeline_settings, registry=registry)
    bootstrap, topic = pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic
    want = expected(histories)
    async with running(projector) as tasks:
        await produce(bootstrap, topic, published)
        await wait_until(lambda: read_wallets(read_engine) == want, tasks=tasks)
        # Everything again: a redelivery, then the reconciler's replay (marked as one).
        replayed = [
            (key, value, kafka_headers(e.event_type, e.schema_version, e.event_id, replay=True))
            for e in published
            for key, value, _ in [record_parts(e)]
        ]
        await produce(bootstrap, topic, [*published, *replayed])
        await wait_until(
            lambda: metric(registry, "kessai_projector_duplicates_total") >= 2 * len(published),
            tasks=tasks,
        )
    assert read_wallets(read_engine) == want
    assert metric(registry, "kessai_projector_events_applied_total") == len(published)
    assert count(read_engine, payments) == len(payment_events)
    assert count(read_engine, parked_events) == 0
    assert count(read_engine, dead_letters) == 0


async def test_a_wallet_gap_is_parked_until_the_missing_movement_arrives(
    pipeline_settings: Settings, read_engine: Engine
) -> None:
    history = wallet_history("u-gap", [("top_up", 5_000), ("payment", 1_500), ("refund", 500)])
    first, second, third = history
    projector = Projector(engine=read_engine, settings=pipeline_settings)
    bootstrap, topic = pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic
    async with running(projector) as tasks:
        await produce(bootstrap, topic, [third, second])
        await wait_until(lambda: count(read_engine, parked_events) == 2, tasks=tasks)
        assert count(read_engine, wallets) == 0
        assert count(read_engine, wallet_movements) == 0
        await produce(bootstrap, topic, [first])
        await wait_until(lambda: count(read_engine, parked_events) == 0, tasks=tasks)
    assert read_wallets(read_engine) == expected([history])


async def test_a_wallet_event_under_another_key_is_a_dead_letter_while_others_flow(
    pipeline_settings: Settings, read_engine: Engine
) -> None:
    (victim,) = wallet_history("u-victim", [("top_up", 1_000)])
    (misfiled,) = wallet_history("u-misfiled", [("top_up", 2_000)])
    bystander = wallet_history("u-bystander", [("top_up", 3_000), ("payment", 1_000)])
    _, value, headers = record_parts(victim)
    _, misfiled_value, misfiled_headers = record_parts(misfiled)
    projector = Projector(engine=read_engine, settings=pipeline_settings)
    bootstrap, topic = pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic
    async with running(projector) as tasks:
        await produce(
            bootstrap,
            topic,
            [
                # keyed by another user's wallet, and by a payment id
                (kafka_key(wallet_stream_id("u-someone-else")), value, headers),
                (kafka_key(new_id()), misfiled_value, misfiled_headers),
                *bystander,
            ],
        )
        await wait_until(
            lambda: (
                count(read_engine, dead_letters) == 2
                and read_wallets(read_engine) == expected([bystander])
            ),
            tasks=tasks,
        )
    with read_engine.connect() as conn:
        reasons = conn.execute(sa.select(dead_letters.c.reason)).scalars().all()
    assert reasons == ["record key is not the wallet stream of the event's user_id"] * 2
