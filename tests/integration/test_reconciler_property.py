"""A property of the projector and the reconciler together, on MariaDB and the real broker.

Whatever a broken delivery does to a payment's events (drops, duplicates, reorderings, a
later version before an earlier one), one reconciliation run finds exactly the payments whose
read side differs from the fold of the write store (none missed, none invented) and repairs
them through the real path (re-publishing to the broker, the running projector applying), after
which the read side equals the fold of the write store: every payment, its refunds, and its
merchants' daily and hourly totals.

Hypothesis draws each example's history (payments with refunds that keep the ledger valid) and
its delivery schedule. One projector runs for the whole test, and one reconciler whose
incremental runs move the watermark on from example to example; every example uses merchants
of its own, so its totals are exactly the sums of its own events. The read side is looked at
only once the projector's stored offsets have passed every record the example produced.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import orjson
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from hypothesis import given, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.payments import capture_command
from command_service.routes.refunds import refund_command
from command_service.schemas import CreatePayment, CreateRefund
from kessai.broker import ensure_topic, new_producer
from kessai.events import PaymentRefunded, event_to_json, kafka_headers, kafka_key, parse_event
from kessai.ledger import fold
from kessai.schema.read import dead_letters, parked_events, payments, projector_offsets, refunds
from kessai.schema.write import events, outbox
from kessai.settings import Settings
from projector.service import Projector
from reconciler.service import PAYMENT_KINDS, Reconciler
from tests.pipeline import (
    Event,
    assert_read_side_matches,
    expected_totals,
    read_totals,
    running,
    wait_until,
)

T = TypeVar("T")
MAX_EXAMPLES = 40


# -- what hypothesis draws -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentPlan:
    merchant: int
    """Index of one of the example's own merchants."""
    amount: int
    refunds: tuple[int, ...]
    """Refund amounts, in order; together never more than ``amount``."""


@dataclass(frozen=True, slots=True)
class Plan:
    payments: tuple[PaymentPlan, ...]
    deliveries: tuple[tuple[int, int], ...]
    """What reaches the topic, in this order: (index into ``payments``, event version). An
    event missing here was dropped; one that appears twice was delivered twice."""


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    planned = []
    for _ in range(draw(st.integers(1, 6))):
        amount = draw(st.integers(1, 10_000))
        left, refund_amounts = amount, []
        for _ in range(draw(st.integers(0, 3))):
            if left == 0:
                break  # fully refunded: the command service refuses more
            refund = draw(st.integers(1, left))
            refund_amounts.append(refund)
            left -= refund
        planned.append(PaymentPlan(draw(st.integers(0, 2)), amount, tuple(refund_amounts)))
    stored = [(i, v) for i, p in enumerate(planned) for v in range(1, len(p.refunds) + 2)]
    # Delivered once shrinks first: a minimal failing schedule shows only the faults it needs.
    copies = draw(
        st.lists(st.sampled_from([1, 1, 0, 2]), min_size=len(stored), max_size=len(stored))
    )
    sent = [event for event, n in zip(stored, copies, strict=True) for _ in range(n)]
    return Plan(tuple(planned), tuple(draw(st.permutations(sent))))


# -- the write store, the topic, the read side ---------------------------------------------------


def _policy(key: str) -> handlers.WritePolicy:
    return handlers.WritePolicy(
        client_id="test",
        idempotency_key=key,
        retention=timedelta(hours=1),
        shards=8,
        max_attempts=30,
    )


def write_history(engine: Engine, plan: Plan, tag: str) -> list[uuid.UUID]:
    """The plan's payments and refunds through the real command handlers; their payment ids.
    The outbox rows go: this test delivers the events itself, not the relay."""
    ids: list[uuid.UUID] = []
    for i, p in enumerate(plan.payments):
        outcome = handlers.record_alone(
            engine,
            capture_command(
                policy=_policy(f"{tag}-p{i}"),
                command=CreatePayment(
                    merchant_id=f"{tag}-m{p.merchant}",
                    user_id=f"u{i}",
                    amount=p.amount,
                    method="card",
                ),
                device_id=None,
            ),
        )
        pid = uuid.UUID(orjson.loads(outcome.body)["payment_id"])
        ids.append(pid)
        for j, amount in enumerate(p.refunds):
            handlers.record_alone(
                engine,
                refund_command(
                    policy=_policy(f"{tag}-p{i}-r{j}"),
                    payment_id=pid,
                    command=CreateRefund(amount=amount),
                ),
            )
    with engine.begin() as conn:
        conn.execute(outbox.delete().where(outbox.c.payment_id.in_(ids)))
    return ids


def events_of(engine: Engine, ids: Collection[uuid.UUID] | None) -> dict[uuid.UUID, list[Event]]:
    """The write store's events by payment (``None``: every payment), in version order."""
    query = sa.select(events.c.payment_id, events.c.body).order_by(
        events.c.payment_id, events.c.version
    )
    if ids is not None:
        query = query.where(events.c.payment_id.in_(sorted(ids)))
    found: dict[uuid.UUID, list[Event]] = {}
    with engine.connect() as conn:
        for pid, body in conn.execute(query):
            found.setdefault(pid, []).append(parse_event(body))
    return found


async def deliver(
    producer: AIOKafkaProducer, topic: str, schedule: Sequence[Event]
) -> dict[int, int]:
    """Put the events on the topic one at a time, in this order; per partition written to,
    the offset just after the last record (what the projector must reach)."""
    ends: dict[int, int] = {}
    for event in schedule:
        sent = await producer.send_and_wait(
            topic,
            event_to_json(event),
            key=kafka_key(event.payment_id),
            headers=kafka_headers(event.event_type, event.schema_version, event.event_id),
        )
        ends[sent.partition] = max(ends.get(sent.partition, 0), sent.offset + 1)
    return ends


def consumed_up_to(read_engine: Engine, topic: str, ends: dict[int, int]) -> bool:
    """Whether the projector's stored position has reached ``ends`` on every partition."""
    with read_engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.select(
                    projector_offsets.c.kafka_partition, projector_offsets.c.next_offset
                ).where(projector_offsets.c.topic == topic)
            ).all()
        )
    return all(stored.get(p, 0) >= end for p, end in ends.items())


def drifted(
    write_engine: Engine, read_engine: Engine, ids: Collection[uuid.UUID] | None
) -> set[uuid.UUID]:
    """Payments (``None``: all) whose read side is not the fold of their events: no row, a row
    or refunds that differ, or events of theirs parked or dead-lettered."""
    expected = events_of(write_engine, ids)
    wanted = sorted(ids) if ids is not None else sorted(expected)
    with read_engine.connect() as conn:
        rows = {
            row.payment_id: (row.captured_amount, row.refunded_amount, row.version, row.status)
            for row in conn.execute(sa.select(payments).where(payments.c.payment_id.in_(wanted)))
        }
        refund_rows: dict[uuid.UUID, list[tuple[int, int]]] = {}
        for pid, version, amount in conn.execute(
            sa.select(refunds.c.payment_id, refunds.c.version, refunds.c.amount)
            .where(refunds.c.payment_id.in_(wanted))
            .order_by(refunds.c.payment_id, refunds.c.version)
        ):
            refund_rows.setdefault(pid, []).append((int(version), int(amount)))
        parked_query = sa.select(parked_events.c.payment_id)
        letters_query = sa.select(dead_letters.c.payment_id).where(dead_letters.c.status == "open")
        if ids is not None:
            parked_query = parked_query.where(parked_events.c.payment_id.in_(wanted))
            letters_query = letters_query.where(dead_letters.c.payment_id.in_(wanted))
        stuck = set(conn.execute(parked_query).scalars())
        stuck |= {pid for pid in conn.execute(letters_query).scalars() if pid is not None}
    wrong = set(stuck)
    for pid in wanted:
        state = fold(expected.get(pid, []))
        if state is None:
            continue
        want = (state.captured_amount, state.refunded_amount, state.version, state.status)
        want_refunds = [
            (e.version, e.payload.amount) for e in expected[pid] if isinstance(e, PaymentRefunded)
        ]
        if rows.get(pid) != want or refund_rows.get(pid, []) != want_refunds:
            wrong.add(pid)
    return wrong


def assert_example_matches(
    write_engine: Engine, read_engine: Engine, ids: Collection[uuid.UUID], merchants: set[str]
) -> None:
    """The example's payments, refunds and merchant totals equal the fold of its events."""
    assert drifted(write_engine, read_engine, ids) == set()
    evs = [e for history in events_of(write_engine, ids).values() for e in history]
    daily, hourly = expected_totals(evs)
    actual_daily, actual_hourly = read_totals(read_engine)
    assert {k: v for k, v in actual_daily.items() if k[0] in merchants} == daily
    assert {k: v for k, v in actual_hourly.items() if k[0] in merchants} == hourly


# -- the property --------------------------------------------------------------------------------


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
            "reconcile_chunk_size": 7,  # several chunks even in a small example
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
# The projector's consumer (on the event loop's thread) draws on the global ``random`` while
# hypothesis generates an example in the worker thread; hypothesis takes that for the strategy.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_any_broken_delivery_is_found_exactly_and_repaired(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    loop = asyncio.get_running_loop()
    topic = rsettings.topic
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)
    bootstrap = rsettings.resolved_kafka_bootstrap()
    # Created before anything is produced: never auto-created with another partition count.
    await ensure_topic(bootstrap, topic, partitions=rsettings.topic_partitions)
    producer = new_producer(bootstrap)
    examples = itertools.count()
    # Per partition, the offset the projector must reach before the read side is looked at.
    ends: dict[int, int] = {}

    async with running(Projector(engine=read_engine, settings=rsettings)) as tasks:
        await producer.start()

        def on_loop(coro: Coroutine[Any, Any, T]) -> T:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        def settle(check: Callable[[], bool]) -> None:
            on_loop(wait_until(check, tasks=tasks))

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None
        )
        @given(plan=plans())
        def broken_delivery_then_one_run(plan: Plan) -> None:
            tag = f"x{next(examples)}"
            ids = write_history(write_engine, plan, tag)
            merchants = {f"{tag}-m{p.merchant}" for p in plan.payments}
            stored = events_of(write_engine, ids)
            schedule = [stored[ids[i]][version - 1] for i, version in plan.deliveries]
            for p, end in on_loop(deliver(producer, topic, schedule)).items():
                ends[p] = max(ends.get(p, 0), end)
            settle(lambda: consumed_up_to(read_engine, topic, ends))

            differing = drifted(write_engine, read_engine, ids)
            # Anything else that differs was left by an earlier failing example (while shrinking).
            anywhere = drifted(write_engine, read_engine, None)
            result = on_loop(reconciler.run())
            found = {f.payment_id for f in result.findings if f.kind in PAYMENT_KINDS}
            note(f"payment ids: {ids}")
            note(f"differing before the run: {sorted(map(ids.index, differing))}")
            note(f"findings: {[(f.kind, f.payment_id, f.repaired) for f in result.findings]}")

            assert (result.outcome, result.exit_code, result.error) == ("consistent", 0, None)
            assert all(f.repaired for f in result.findings)
            assert differing <= found, "a payment that differed was not found"
            assert found <= anywhere, "a payment that did not differ was reported"
            # Drops, duplicates and reorderings leave each row a prefix of its fold and the
            # totals equal to their rows. Only a payment none of whose events was applied left
            # its merchant's totals short of its events: those, and only those, are rewritten.
            short = {f.merchant_id for f in result.findings if f.kind == "missing"}
            others = [f for f in result.findings if f.kind not in PAYMENT_KINDS]
            assert {f.kind for f in others} <= {"daily_totals", "hourly_totals"}
            assert {f.merchant_id for f in others} <= short
            assert_example_matches(write_engine, read_engine, ids, merchants)

        try:
            await asyncio.to_thread(broken_delivery_then_one_run)
        finally:
            await producer.stop()

        # Every example together: the whole read side is the fold of the whole write store, and
        # a full run finds nothing left to do.
        assert_read_side_matches(write_engine, read_engine)
        final = await reconciler.run(full=True)
        assert (final.outcome, final.findings) == ("consistent", [])
