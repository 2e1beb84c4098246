"""A cashback campaign's budget is spent exactly, through faults: 10,000 payments, two
``python -m rewards`` processes of one consumer group, one SIGKILLed mid-run and started
again, and the broker restarted empty once (what it held is re-published from the write store,
as the reconciler re-publishes a payment's history).

The payments are chosen so that the budget runs out with the last one: every payment's 20% is
a multiple of 3 yen and together they ask for 1,000,002 yen, two more than the budget (which is
1 modulo 3, so no sum of whole grants can equal it). So every payment is granted its full 20%
except the last one decided, which is cut by 2 yen, and that grant records the exhaustion. A
payment lost on the way (the broker's restart, the kill) would leave the budget unspent and
the test waiting; a payment granted twice would exhaust it early and leave another ungranted.
Payments made after the exhaustion is recorded get nothing.

"Before" and "after" are the order the grants were decided in. Grants that reach one campaign
are decided one batch after another (each batch appends the campaign's next ``campaign_budget``
version, reading the previous one), and their event ids are UUIDv7 made as they are decided,
so the grants' event ids order them; the exhaustion is the campaign's version 2 (after its
creation), with an event id above every grant's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from aiokafka.errors import KafkaError
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.relay import Relay
from command_service.routes.payments import capture_command
from command_service.schemas import CreatePayment
from kessai.broker import ensure_topic, free_port
from kessai.campaigns import decide_create, parse_rules
from kessai.clock import utcnow
from kessai.events import RewardGranted
from kessai.schema.write import campaign_budget, campaign_events, events, outbox, reward_grants
from kessai.settings import Settings
from kessai.write_store import append_events
from reconciler.loaders import EventRow
from reconciler.republish import republisher
from tests.helpers import fund, new_key, own_broker, restart_on_same_port
from tests.pipeline import running as running_components
from tests.pipeline import wait_until, write_store_wallet_events
from tests.rewards import grants_count, scraped, spawn_rewards

CAMPAIGN = "cashback-budget"
BUDGET = 1_000_000
PAYMENTS = 10_000
LATE_PAYMENTS = 200
PAYERS = [f"payer-{n}" for n in range(500)]
KILL_AT = 1_500
"""Grants recorded when one rewards process is SIGKILLed."""
BROKER_RESTART_AT = 3_500
"""Grants recorded when the broker is killed and a new, empty one started."""


def amounts_asking_for(budget: int, count: int, *, seed: int = 14) -> list[int]:
    """``count`` payment amounts, each a multiple of 15 yen (so its 20% is a multiple of 3),
    whose 20% sum to ``budget + 2`` (``budget`` must be 1 modulo 3): every grant but the last
    decided fits the budget whole, and the last is cut by 2."""
    assert budget % 3 == 1
    rng = random.Random(seed)
    units = [rng.randint(20, 46) for _ in range(count)]  # 20% of 15 * u is 3 * u yen
    missing = (budget + 2) // 3 - sum(units)
    assert 0 <= missing < count * 14
    while missing:
        i = rng.randrange(count)
        if units[i] < 60:
            units[i] += 1
            missing -= 1
    return [15 * u for u in units]


def create_campaign(engine: Engine) -> None:
    now = utcnow()
    rules = {
        "campaign_id": CAMPAIGN,
        "name": "20% back until a million yen is spent",
        "kind": "cashback",
        "currency": "JPY",
        "budget": BUDGET,
        "starts_at": (now - timedelta(days=1)).isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
        "rate_bp": 2000,
        "cap_per_payment": 10**9,
        "cap_per_user_month": 10**12,
    }
    with engine.begin() as conn:
        append_events(conn, [decide_create(parse_rules(rules), now=now, actor="admin")], shards=8)


def record_payments(engine: Engine, amounts: Sequence[int], *, threads: int = 4) -> list[uuid.UUID]:
    """One payment per amount through the command path (``record_alone``, as the payments
    route records it), ``threads`` at a time: card and balance payments alternately, by the
    funded ``PAYERS`` in turn. Returns the payments' ids, in the order of ``amounts``."""

    def one(index: int) -> uuid.UUID:
        policy = handlers.WritePolicy(
            client_id="test",
            idempotency_key=new_key("pay"),
            retention=timedelta(hours=1),
            shards=8,
            max_attempts=30,
        )
        command = CreatePayment(
            merchant_id=f"shop-{index % 7}",
            user_id=PAYERS[index % len(PAYERS)],
            amount=amounts[index],
            method="card" if index % 2 else "balance",
        )
        outcome = handlers.record_alone(
            engine, capture_command(policy=policy, command=command, device_id=None)
        )
        return uuid.UUID(orjson.loads(outcome.body)["payment_id"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(amounts))))


def captured_rows(engine: Engine) -> list[EventRow]:
    """Every ``PaymentCaptured`` of the write store, as the reconciler re-publishes events."""
    e = events.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(e.payment_id, e.version, e.event_id, e.event_type, e.schema_version, e.body)
            .where(e.event_type == "PaymentCaptured")
            .order_by(e.payment_id, e.version)
        )
        return [(pid, int(v), eid, et, int(sv), body) for pid, v, eid, et, sv, body in rows]


async def republish_captured(settings: Settings, engine: Engine) -> int:
    """Publish every captured payment again (a new broker's first seconds refuse produce
    requests: tried again until it takes them). Returns how many were sent."""
    rows = await asyncio.to_thread(captured_rows, engine)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            async with republisher(settings) as send:
                return await send(rows)
        except (KafkaError, OSError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


def exhausted(engine: Engine) -> bool:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(sa.func.count())
            .select_from(campaign_events)
            .where(campaign_events.c.event_type == "CampaignBudgetExhausted")
        ).scalar_one()
    return bool(found)


def granted_sum(engine: Engine) -> int:
    with engine.connect() as conn:
        total = conn.execute(
            sa.select(sa.func.sum(reward_grants.c.amount)).where(
                reward_grants.c.campaign_id == CAMPAIGN
            )
        ).scalar_one()
    return int(total or 0)


def outbox_empty(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one() == 0


class Instances:
    """The two rewards processes of the test's group, each with its own metrics port."""

    def __init__(self, settings: Settings, home: Path, started: list[subprocess.Popen[bytes]]):
        self.settings = settings
        self.home = home
        self.started = started
        self.live: list[tuple[subprocess.Popen[bytes], int]] = []

    def spawn(self) -> None:
        port = free_port()
        process = spawn_rewards(self.settings, self.home, batch_size=500, metrics_port=port)
        self.started.append(process)
        self.live.append((process, port))

    def kill_one(self) -> None:
        process, _port = self.live.pop(0)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL

    def refused_as_exhausted(self) -> float:
        return sum(
            scraped(port, "kessai_rewards_skipped_total", reason="exhausted")
            for _process, port in self.live
        )

    def stop(self) -> None:
        for process, _port in self.live:
            process.send_signal(signal.SIGTERM)
        for process, _port in self.live:
            assert process.wait(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_the_budget_is_spent_exactly_through_a_kill_and_an_empty_broker(
    settings: Settings,
    write_engine: Engine,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    amounts = amounts_asking_for(BUDGET, PAYMENTS)
    with own_broker(tmp_path) as broker:
        settings = settings.model_copy(
            update={
                "kafka_bootstrap": broker.bootstrap,
                "kafka_request_timeout_ms": 1_000,
                "rewards_group_id": f"kessai-rewards-{settings.topic}",
            }
        )
        await ensure_topic(broker.bootstrap, settings.topic, partitions=settings.topic_partitions)
        create_campaign(write_engine)
        await asyncio.to_thread(fund, write_engine, *PAYERS)
        instances = Instances(settings, tmp_path, processes)
        relay = Relay(engine=write_engine, settings=settings)
        async with running_components(relay) as tasks:
            instances.spawn()
            instances.spawn()
            paying = asyncio.create_task(asyncio.to_thread(record_payments, write_engine, amounts))
            try:
                await wait_until(
                    lambda: grants_count(write_engine) >= KILL_AT, tasks=tasks, within=120
                )
                instances.kill_one()
                instances.spawn()
                await wait_until(
                    lambda: grants_count(write_engine) >= BROKER_RESTART_AT, tasks=tasks, within=120
                )
                granted_at_the_restart = grants_count(write_engine)
                broker.kill()
                restart_on_same_port(broker)
                await ensure_topic(
                    broker.bootstrap, settings.topic, partitions=settings.topic_partitions
                )
                await republish_captured(settings, write_engine)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(paying), timeout=300)
            payment_ids = paying.result()
            await until_spent(write_engine, tasks)
            late_ids = await asyncio.to_thread(
                record_payments, write_engine, [1_500] * LATE_PAYMENTS
            )
            await wait_until(lambda: outbox_empty(write_engine), tasks=tasks)
            await wait_until(lambda: instances.refused_as_exhausted() >= LATE_PAYMENTS, tasks=tasks)
            instances.stop()

    assert granted_at_the_restart < PAYMENTS  # the broker restarted mid-run
    last_grant = assert_granted_once_and_in_order(write_engine, payment_ids, amounts, late_ids)
    assert_exhausted_once_after(write_engine, last_grant)


async def until_spent(engine: Engine, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for the exhaustion; if it never comes, say how much was granted."""
    try:
        await wait_until(lambda: exhausted(engine), tasks=tasks, within=120)
    except AssertionError as error:
        granted = await asyncio.to_thread(granted_sum, engine)
        raise AssertionError(
            f"the budget was not spent: {granted:,} of {BUDGET:,} granted in "
            f"{grants_count(engine):,} grants (a payment lost on the way?)"
        ) from error


def assert_granted_once_and_in_order(
    engine: Engine, payment_ids: list[uuid.UUID], amounts: list[int], late_ids: list[uuid.UUID]
) -> uuid.UUID:
    """Every payment granted once, those after the exhaustion never; in the order decided
    (event ids) every grant whole but the last, cut by 2 yen. Returns the last grant's id."""
    granted = sorted(
        (e for e in write_store_wallet_events(engine) if isinstance(e, RewardGranted)),
        key=lambda e: e.event_id,
    )
    grants = [e.payload for e in granted]
    assert {g.campaign_id for g in grants} == {CAMPAIGN}
    by_payment = Counter(str(g.payment_id) for g in grants)
    assert max(by_payment.values()) == 1, "a payment was granted twice"
    assert set(by_payment) == {str(p) for p in payment_ids}
    assert not set(by_payment) & {str(p) for p in late_ids}
    assert sum(g.amount for g in grants) == BUDGET
    asked = {str(p): amount // 5 for p, amount in zip(payment_ids, amounts, strict=True)}
    assert [g.requested for g in grants] == [asked[str(g.payment_id)] for g in grants]
    assert [g for g in grants if g.cut] == [grants[-1]]
    assert grants[-1].requested - grants[-1].amount == 2
    return granted[-1].event_id


def assert_exhausted_once_after(engine: Engine, last_grant: uuid.UUID) -> None:
    """One ``CampaignBudgetExhausted`` (the campaign's version 2), decided after the last
    grant; the budget's stream rising to the budget exactly, once, and the keys' rows summing
    to it."""
    with engine.connect() as conn:
        campaign = conn.execute(
            sa.select(
                campaign_events.c.version, campaign_events.c.event_type, campaign_events.c.event_id
            )
            .where(campaign_events.c.campaign_id == CAMPAIGN)
            .order_by(campaign_events.c.version)
        ).all()
        budget_rows = conn.execute(
            sa.select(campaign_budget.c.grants, campaign_budget.c.granted_after)
            .where(campaign_budget.c.campaign_id == CAMPAIGN)
            .order_by(campaign_budget.c.version)
        ).all()
        key_rows = conn.execute(
            sa.select(sa.func.count(), sa.func.sum(reward_grants.c.amount)).where(
                reward_grants.c.campaign_id == CAMPAIGN
            )
        ).one()
    assert [(v, t) for v, t, _ in campaign] == [
        (1, "CampaignCreated"),
        (2, "CampaignBudgetExhausted"),
    ]
    assert campaign[1].event_id > last_grant
    totals = [after for _grants, after in budget_rows]
    assert totals == sorted(totals)
    assert totals[-1] == BUDGET
    assert totals.count(BUDGET) == 1
    assert sum(n for n, _after in budget_rows) == PAYMENTS
    assert (key_rows[0], int(key_rows[1])) == (PAYMENTS, BUDGET)
