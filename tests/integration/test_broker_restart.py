"""The embedded broker SIGKILLed under load and restarted on the same port: the pipeline heals.

The relay and the projector run while payments and refunds are written through the real
handlers. At a moment when the projector has applied everything the broker acknowledged (so
that nothing is lost with the broker's memory and no reconciler is needed), the broker is
killed and a new, empty one is started on the same address, either with the topic created right
away (as ``kessai up``'s supervisor does) or with nobody creating it. Then, without any
reconciler run:

- the topic has the configured partition count (8, not the 4 of auto-creation);
- the relay published each stream's events (a payment's, or a wallet's: the traffic's balance
  payments and refunds move their payers' wallets) to the new log in version order, in one
  partition;
- the read side equals the fold of the write store, every event applied, wallets included;
- a payment written after the restart is visible within a few seconds of the broker's return.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service import outbox as outbox_sql
from command_service.relay import Relay
from command_service.routes.payments import capture_command
from command_service.schemas import CreatePayment
from kessai.broker import EmbeddedBroker, ensure_topic, log_ends
from kessai.schema.read import payments, wallets
from kessai.schema.write import outbox
from kessai.settings import Settings
from projector.service import Projector
from tests.helpers import (
    consume_all,
    fund,
    own_broker,
    restart_on_same_port,
    unpublished_events,
)
from tests.pipeline import (
    assert_read_side_matches,
    assert_wallets_match,
    fold_by_payment,
    make_traffic,
    published_stream_event,
    read_side_matches,
    running,
    stored_stream_events,
    wallets_match,
    write_store_events,
)
from tests.pipeline import wait_until as pipeline_wait_until

log = logging.getLogger(__name__)

PARTITIONS = 8  # not the 4 the broker gives a topic it creates by itself


def applied_versions(engine: Engine) -> dict[uuid.UUID, int]:
    """Stream id -> the version the read side is at: of each payment, and of each wallet (by
    its ``wallet_stream_id``, the key its events are published under)."""
    with engine.connect() as conn:
        applied = {
            row.payment_id: row.version
            for row in conn.execute(sa.select(payments.c.payment_id, payments.c.version))
        }
        applied.update(
            (row.stream_id, row.version)
            for row in conn.execute(sa.select(wallets.c.stream_id, wallets.c.version))
        )
        return applied


class KillWhenConsumed:
    """An ``after_publish`` hook of the relay: after ``rounds`` acknowledged rounds, waits until
    the projector applied every event acknowledged so far, then SIGKILLs the broker (the
    relay's next round meets a dead broker)."""

    def __init__(self, broker: EmbeddedBroker, read: Engine, rounds: int) -> None:
        self.broker = broker
        self.read = read
        self.rounds = rounds
        self.acked: dict[uuid.UUID, int] = {}
        self.killed = asyncio.Event()

    async def __call__(self, rows: Sequence[outbox_sql.OutboxRow]) -> None:
        for row in rows:
            self.acked[row.payment_id] = max(row.version, self.acked.get(row.payment_id, 0))
        if self.killed.is_set():
            return
        self.rounds -= 1
        if self.rounds > 0:
            return

        def consumed() -> bool:
            applied = applied_versions(self.read)
            return all(applied.get(p, 0) >= v for p, v in self.acked.items())

        await pipeline_wait_until(consumed, within=30)
        self.broker.kill()
        self.killed.set()


def drift(write: Engine, read: Engine) -> str:
    expected = {
        pid: state.version for pid, state in fold_by_payment(write_store_events(write)).items()
    }
    applied = applied_versions(read)
    missing = expected.keys() - applied.keys()
    behind = {p for p in expected.keys() & applied.keys() if applied[p] != expected[p]}
    with write.connect() as conn:
        unpublished = conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one()
    return (
        f"{len(missing)} of {len(expected)} payments missing, {len(behind)} behind, "
        f"{unpublished} events unpublished"
    )


async def partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert topic in await admin.list_topics()
        described = await admin.describe_topics([topic])
        return len(described[0]["partitions"])
    finally:
        await admin.close()


AFTER_RESTART_PAYER = "u9"


def write_one_payment(engine: Engine) -> uuid.UUID:
    outcome = handlers.record_alone(
        engine,
        capture_command(
            policy=handlers.WritePolicy(
                client_id="test",
                idempotency_key=f"after-restart-{uuid.uuid4()}",
                retention=timedelta(hours=1),
                shards=8,
                max_attempts=30,
            ),
            command=CreatePayment(
                merchant_id="m9", user_id=AFTER_RESTART_PAYER, amount=500, method="balance"
            ),
            device_id=None,
        ),
    )
    return uuid.UUID(orjson.loads(outcome.body)["payment_id"])


@pytest.mark.slow
@pytest.mark.parametrize("creator", ["supervisor", "nobody"])
async def test_broker_sigkilled_under_load_and_restarted_heals_by_itself(
    pipeline_settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    tmp_path: Path,
    creator: str,
) -> None:
    with own_broker(tmp_path) as broker:
        settings = pipeline_settings.model_copy(
            update={
                "kafka_bootstrap": broker.bootstrap,
                "kafka_request_timeout_ms": 1_000,
                "topic_partitions": PARTITIONS,
                "relay_batch_size": 100,
            }
        )
        fund(write_engine, AFTER_RESTART_PAYER)  # pays write_one_payment after the restart
        kill = KillWhenConsumed(broker, read_engine, rounds=5)
        registry = CollectorRegistry()
        relay = Relay(engine=write_engine, settings=settings, after_publish=kill)
        projector = Projector(engine=read_engine, settings=settings, registry=registry)
        async with running(relay, projector) as tasks:
            traffic = asyncio.create_task(
                asyncio.to_thread(
                    make_traffic,
                    write_engine,
                    payments_count=1500,
                    refund_share=0.3,
                    second_refund_share=0.3,
                    seed=11,
                )
            )
            await pipeline_wait_until(kill.killed.is_set, tasks=tasks, within=60)
            restart_on_same_port(broker)
            if creator == "supervisor":
                await ensure_topic(broker.bootstrap, settings.topic, partitions=PARTITIONS)
            back = time.monotonic()
            more = asyncio.create_task(
                asyncio.to_thread(make_traffic, write_engine, payments_count=300, seed=12)
            )
            new_payment = await asyncio.to_thread(write_one_payment, write_engine)
            await pipeline_wait_until(
                lambda: new_payment in applied_versions(read_engine), tasks=tasks, within=15
            )
            visible_after = time.monotonic() - back
            log.warning(
                "a payment written after the restart was visible after %.2f s", visible_after
            )

            await traffic
            await more
            try:
                await pipeline_wait_until(
                    lambda: (
                        read_side_matches(write_engine, read_engine)
                        and wallets_match(write_engine, read_engine)
                    ),
                    tasks=tasks,
                    within=60,
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {drift(write_engine, read_engine)}") from exc
        assert_read_side_matches(write_engine, read_engine)
        assert_wallets_match(write_engine, read_engine)
        assert await partition_count(broker.bootstrap, settings.topic) == PARTITIONS

        ends = await log_ends(broker.bootstrap, settings.topic, PARTITIONS)
        new_log = await consume_all(broker.bootstrap, settings.topic, at_least=sum(ends.values()))
    partition_of: dict[uuid.UUID, set[int]] = {}
    first_seen: dict[uuid.UUID, list[int]] = {}
    seen: set[tuple[uuid.UUID, int]] = set()
    for record in sorted(new_log, key=lambda r: (r.partition, r.offset)):
        stream_id, version = published_stream_event(record)
        partition_of.setdefault(stream_id, set()).add(record.partition)
        if (stream_id, version) not in seen:
            seen.add((stream_id, version))
            first_seen.setdefault(stream_id, []).append(version)
    split = {p for p, parts in partition_of.items() if len(parts) > 1}
    assert not split, f"{len(split)} streams have events in several partitions of the new log"
    out_of_order = {p: v for p, v in first_seen.items() if v != sorted(v)}
    assert not out_of_order, f"published out of version order: {out_of_order}"


class CountingRelay(Relay):
    """Counts the relay's checks of the topic's partition count."""

    checks = 0

    def _check_partition_count(self, actual: int) -> None:
        self.checks += 1
        super()._check_partition_count(actual)


async def test_a_topic_with_another_partition_count_gets_nothing_and_one_error(
    settings: Settings, write_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic that exists with 4 partitions while 8 are configured (what auto-creation leaves
    behind): the relay publishes nothing to it, logs one error however often it checks again,
    and its metric shows it."""
    await ensure_topic(settings.resolved_kafka_bootstrap(), settings.topic, partitions=4)
    s = settings.model_copy(update={"topic_partitions": PARTITIONS})
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, refund_share=0.0)
    registry = CollectorRegistry()
    relay = CountingRelay(engine=write_engine, settings=s, registry=registry)
    caplog.set_level(logging.WARNING, logger="command_service.relay")
    async with running(relay) as tasks:
        await pipeline_wait_until(lambda: relay.checks >= 3, tasks=tasks, within=20)
        assert registry.get_sample_value("kessai_relay_topic_mismatch") == 1
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("command")
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "4 partitions, 8 configured" in errors[0].getMessage()
    # Nothing was published: every event (the 20 payments, and the payers' wallets' top-ups and
    # debits) is still in the outbox.
    assert len(write_store_events(write_engine)) == 20
    assert unpublished_events(write_engine) == set(stored_stream_events(write_engine))
    ends = await log_ends(s.resolved_kafka_bootstrap(), s.topic, 4)
    assert sum(ends.values()) == 0
