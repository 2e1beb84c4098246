"""The projector against the real broker and the real read database (SQLite and MySQL).

Each test ends with the read side compared with the fold of the write store, exactly:
every payment's amounts, version and status, every merchant's daily and hourly totals. The
traffic's balance payments and refunds move their payers' wallets too (``make_traffic`` funds
them first): where a test counts the events applied, those count, and the wallets are compared
with the fold of their streams as well (``assert_wallets_match``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.broker import EmbeddedBroker, free_port
from kessai.ids import new_id
from kessai.schema.read import dead_letters, parked_events, payments, projector_offsets
from kessai.settings import Settings
from projector.apply import Record
from projector.service import Projector
from tests.pipeline import (
    assert_read_side_matches,
    assert_wallets_match,
    make_traffic,
    produce,
    read_side_matches,
    running,
    wait_until,
    wallets_match,
    write_store_events,
    write_store_wallet_events,
)
from tests.unit.test_projector_apply import captured, refunded


def count(engine: Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


def all_projected(write_engine: Engine, read_engine: Engine) -> bool:
    """The read side's payments, totals and wallets all equal the fold of the write store."""
    return read_side_matches(write_engine, read_engine) and wallets_match(write_engine, read_engine)


def stored_count(engine: Engine) -> int:
    """Events of the write store, payments' and wallets': each is applied once."""
    return len(write_store_events(engine)) + len(write_store_wallet_events(engine))


async def test_payments_and_refunds_are_projected_exactly(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=300)
    relay = Relay(engine=write_engine, settings=pipeline_settings)
    projector = Projector(engine=read_engine, settings=pipeline_settings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
    assert count(read_engine, payments) == len(traffic.payment_ids)
    assert count(read_engine, parked_events) == 0
    assert count(read_engine, dead_letters) == 0


async def test_events_delivered_twice_change_nothing(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=100)
    registry = CollectorRegistry()
    projector = Projector(engine=read_engine, settings=pipeline_settings, registry=registry)
    relay = Relay(engine=write_engine, settings=pipeline_settings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        stored = [*write_store_events(write_engine), *write_store_wallet_events(write_engine)]
        await produce(pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic, stored)
        await wait_until(
            lambda: metric(registry, "kessai_projector_duplicates_total") >= len(stored),
            tasks=tasks,
        )
    assert metric(registry, "kessai_projector_events_applied_total") == len(stored)
    assert_read_side_matches(write_engine, read_engine)
    assert_wallets_match(write_engine, read_engine)


async def test_version_two_before_version_one_ends_in_the_right_state(
    pipeline_settings: Settings, read_engine: Engine
) -> None:
    pid = new_id()
    first, second, third = captured(pid), refunded(pid, 2, 100, 100), refunded(pid, 3, 50, 150)
    projector = Projector(engine=read_engine, settings=pipeline_settings)
    bootstrap, topic = pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic
    async with running(projector) as tasks:
        await produce(bootstrap, topic, [third, second])
        await wait_until(lambda: count(read_engine, parked_events) == 2, tasks=tasks)
        assert count(read_engine, payments) == 0
        await produce(bootstrap, topic, [first])
        await wait_until(lambda: count(read_engine, parked_events) == 0, tasks=tasks)
    with read_engine.connect() as conn:
        row = conn.execute(sa.select(payments).where(payments.c.payment_id == pid)).one()
    assert (row.captured_amount, row.refunded_amount, row.version, row.status) == (
        1000,
        150,
        3,
        "partially_refunded",
    )


async def test_a_poison_message_is_dead_lettered_while_other_payments_flow(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    victim = new_id()
    bootstrap, topic = pipeline_settings.resolved_kafka_bootstrap(), pipeline_settings.topic
    projector = Projector(engine=read_engine, settings=pipeline_settings)
    relay = Relay(engine=write_engine, settings=pipeline_settings)
    async with running(projector) as tasks:
        await produce(
            bootstrap,
            topic,
            [
                captured(victim),
                (str(victim).encode(), b'{"version": 2, "garbage": true}', []),
                refunded(victim, 3, 10, 20),
            ],
        )
        await asyncio.to_thread(make_traffic, write_engine, payments_count=1000, refund_share=0)
        async with running(relay):
            await wait_until(lambda: count(read_engine, payments) == 1001, tasks=tasks, within=120)
    assert count(read_engine, dead_letters, dead_letters.c.status == "open") == 1
    with read_engine.connect() as conn:
        letter = conn.execute(sa.select(dead_letters)).one()
        parked = conn.execute(sa.select(parked_events)).one()
    assert (letter.payment_id, letter.version) == (victim, 2)
    assert letter.reason.startswith("undecodable event")
    assert letter.raw_value == b'{"version": 2, "garbage": true}'
    assert (parked.payment_id, parked.version, parked.reason) == (victim, 3, "blocked")


async def _published(settings: Settings, write_engine: Engine, payments_count: int) -> None:
    """Traffic through the real handlers, all of it on the topic before a projector starts,
    so the projector always has a next batch fetched while one is in the database."""
    await asyncio.to_thread(make_traffic, write_engine, payments_count=payments_count)
    async with running(Relay(engine=write_engine, settings=settings)):
        await wait_until(lambda: _outbox_empty(write_engine), within=60)


async def test_seeks_while_the_next_batch_is_fetched_skip_nothing(
    pipeline_settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = pipeline_settings.model_copy(update={"projector_batch_size": 25})
    await _published(settings, write_engine, payments_count=400)
    projector = Projector(engine=read_engine, settings=settings)
    # Injected: every third pass of the loop seeks one assigned partition to its stored offset
    # (as a stall, a log reset or a rebalance does), while a fetched batch waits to be applied.
    idle_checks, drop = projector._idle_checks, projector._drop
    passes, dropped = [0], [0]

    async def seeking_idle_checks() -> None:
        passes[0] += 1
        consumer = projector._consumer
        if passes[0] % 3 == 0 and consumer is not None and consumer.assignment():
            assigned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
            await projector._seek_to_stored([assigned[passes[0] % len(assigned)]])
        await idle_checks()

    def counted_drop(records: list[Record]) -> None:
        dropped[0] += len(records)
        drop(records)

    monkeypatch.setattr(projector, "_idle_checks", seeking_idle_checks)
    monkeypatch.setattr(projector, "_drop", counted_drop)
    async with running(projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks, within=90)
    assert dropped[0] > 0, "no fetched batch was ever dropped: the seeks injected nothing"
    assert count(read_engine, parked_events) == 0


async def test_read_db_failures_while_the_next_batch_is_fetched_lose_nothing(
    pipeline_settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = pipeline_settings.model_copy(update={"projector_batch_size": 25})
    await _published(settings, write_engine, payments_count=300)
    registry = CollectorRegistry()
    projector = Projector(engine=read_engine, settings=settings, registry=registry)
    # Injected: every fourth batch transaction fails as an unreachable read DB would, after
    # the next batch was fetched (and its partitions' positions moved past it).
    in_transaction, calls = projector._apply_in_transaction, [0]

    def failing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] % 4 == 0:
            raise sa.exc.OperationalError("injected", None, ConnectionError("read DB gone"))
        return in_transaction(*args)

    monkeypatch.setattr(projector, "_apply_in_transaction", failing)
    async with running(projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks, within=120)
    assert calls[0] >= 8  # at least two failures injected
    assert metric(registry, "kessai_projector_events_applied_total") == stored_count(write_engine)


@pytest.mark.slow
async def test_two_projectors_in_one_group_apply_everything_exactly_once(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=800)
    registries = [CollectorRegistry(), CollectorRegistry()]
    projectors = [
        Projector(engine=read_engine, settings=pipeline_settings, registry=r) for r in registries
    ]
    relay = Relay(engine=write_engine, settings=pipeline_settings)
    async with running(projectors[0], projectors[1]) as tasks:
        # Both joined and split the partitions before anything is published.
        await wait_until(lambda: all(p.expected for p in projectors), tasks=tasks)
        assert not set(projectors[0].expected) & set(projectors[1].expected)
        async with running(relay):
            await wait_until(
                lambda: all_projected(write_engine, read_engine), tasks=tasks, within=90
            )
    applied = sum(metric(r, "kessai_projector_events_applied_total") for r in registries)
    assert applied == stored_count(write_engine)
    assert all(metric(r, "kessai_projector_events_applied_total") > 0 for r in registries)


@pytest.mark.slow
async def test_broker_restarted_empty_then_fed_new_events_loses_none(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    broker = EmbeddedBroker(free_port())
    broker.start()
    settings = pipeline_settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    registry = CollectorRegistry()
    try:
        relay = Relay(engine=write_engine, settings=settings)
        projector = Projector(engine=read_engine, settings=settings, registry=registry)
        async with running(projector) as tasks:
            await asyncio.to_thread(make_traffic, write_engine, payments_count=300, seed=1)
            async with running(relay):
                await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
            stored_offsets = count(read_engine, projector_offsets)
            assert stored_offsets > 0
            broker.kill()
            broker = EmbeddedBroker(broker.port)
            broker.start()
            # Fewer new events than the old log held: the new offsets are all below the
            # stored ones, which a naive consumer would wait past and so skip.
            await asyncio.to_thread(make_traffic, write_engine, payments_count=40, seed=2)
            async with running(Relay(engine=write_engine, settings=settings)):
                await wait_until(
                    lambda: all_projected(write_engine, read_engine), tasks=tasks, within=90
                )
    finally:
        broker.stop()
    assert metric(registry, "kessai_projector_log_resets_total") >= 1


@pytest.mark.slow
async def test_projector_killed_mid_batch_and_restarted_leaves_totals_exact(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine, tmp_path: Path
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=3000)
    async with running(Relay(engine=write_engine, settings=pipeline_settings)):
        await wait_until(lambda: _outbox_empty(write_engine), within=60)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")},
        "KESSAI_READ_DB_URL": pipeline_settings.resolved_read_db_url(),
        "KESSAI_KAFKA_BOOTSTRAP": pipeline_settings.resolved_kafka_bootstrap(),
        "KESSAI_TOPIC": pipeline_settings.topic,
        "KESSAI_PROJECTOR_GROUP_ID": pipeline_settings.projector_group_id,
        "KESSAI_TOPIC_PARTITIONS": str(pipeline_settings.topic_partitions),
        "KESSAI_PROJECTOR_BATCH_SIZE": "20",
        "KESSAI_HOME": str(tmp_path),
    }

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "projector"],
            env=env,
            stdout=(tmp_path / "projector.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    first = start()
    try:
        await wait_until(lambda: count(read_engine, payments) >= 100, within=60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert count(read_engine, payments) < len(traffic.payment_ids)
    finally:
        if first.poll() is None:
            first.kill()
    second = start()
    try:
        try:
            await wait_until(lambda: all_projected(write_engine, read_engine), within=120)
        except AssertionError as exc:  # say what the projectors did (assignments, seeks)
            log = (tmp_path / "projector.log").read_text(errors="replace")
            raise AssertionError(f"{exc}; projector log:\n{log[-6000:]}") from exc
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0


def _outbox_empty(engine: Engine) -> bool:
    from kessai.schema.write import outbox

    return count(engine, outbox) == 0
