"""The relay's guarantees under injected failures, against the real broker, on both stores.

What must hold whatever fails (broker, relay, network): every event of the write store reaches
the topic (nothing lost), all of a stream's events land in one partition with the first copy
of each version in version order, and the outbox drains. Copies are allowed only where a failure
left the relay without an acknowledgement for something the broker took (a crash between publish
and delete, a send that timed out), never in normal operation.

A stream is a payment or a wallet. The payments here are balance payments by ``PAYER``, so each
payment and each refund also moves that wallet (one more event, on the wallet's stream), after
the top-up that funded it (the ``api`` fixture's): all of them must reach the topic.

The embedded broker keeps everything in memory, so a killed broker takes the records it had
acknowledged with it; tests that kill it read its log first, while nothing is being sent, and
count what it held as delivered. Tests that kill a broker run their own, never the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import sqlalchemy as sa
from aiokafka.structs import ConsumerRecord
from sqlalchemy.engine import Engine

from command_service import outbox as outbox_sql
from command_service.outbox import shard_of
from command_service.relay import Relay
from kessai.broker import EmbeddedBroker, ensure_topic
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.schema.write import events, outbox, relay_leases, wallet_events
from kessai.settings import Settings
from tests.helpers import (
    consume_all,
    count_rows,
    create_payments,
    end_offsets,
    eventually,
    lease_table,
    own_broker,
    restart_on_same_port,
    unpublished_events,
)
from tests.pipeline import (
    assert_streams_delivered_in_order,
    published_stream_event,
    stored_stream_events,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

Records = list[ConsumerRecord[bytes, bytes]]
T = TypeVar("T")


# -- plumbing -------------------------------------------------------------------------------


@pytest.fixture
def reader(settings: Settings) -> Iterator[Engine]:
    """What the test reads the write store through: a read-only engine. (Connections of a
    SQLite write engine begin IMMEDIATE, taking the write lock even to read, which a frozen
    relay would hold.)"""
    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=2, write=False)
    yield engine
    engine.dispose()


class RunningRelay:
    """A relay running as a task of this event loop."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(relay.run(self.stop_event))

    def check(self) -> None:
        """Surface a crash of the relay at once instead of as a timeout."""
        if self.task.done():
            self.task.result()
            raise AssertionError("the relay stopped by itself")

    async def stop(self, within: float = 20.0) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, within)


@contextlib.asynccontextmanager
async def running(*relays: Relay) -> AsyncIterator[list[RunningRelay]]:
    """Relays running for the body of the block; stopped cleanly (and awaited) at its end."""
    started = [RunningRelay(r) for r in relays]
    try:
        yield started
    finally:
        for r in started:
            r.stop_event.set()
        results = await asyncio.wait_for(
            asyncio.gather(*(r.task for r in started), return_exceptions=True), 20
        )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def wait_drained(
    engine: Engine,
    *,
    relays: Sequence[RunningRelay] = (),
    processes: Sequence[subprocess.Popen[bytes]] = (),
    within: float = 30.0,
) -> None:
    """Until the outbox is empty; a relay (task or process) that dies meanwhile fails at once."""

    async def drained() -> bool:
        for relay in relays:
            relay.check()
        for process in processes:
            assert process.poll() is None, f"relay process exited with {process.returncode}"
        return (await asyncio.to_thread(count_rows, engine))["outbox"] == 0

    await eventually(drained, within=within, interval=0.1)


def stored_and_unpublished(engine: Engine) -> tuple[int, int]:
    """How many events the write store holds (payments' and wallets'), and how many of them
    are still in the outbox, read on one connection."""
    with engine.connect() as conn:
        counts = [
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (events, wallet_events, outbox)
        ]
    return counts[0] + counts[1], counts[2]


async def stored_count(engine: Engine) -> int:
    """Events of the write store, payments' and wallets': what the relay has to publish."""
    return (await asyncio.to_thread(stored_and_unpublished, engine))[0]


async def published_count(engine: Engine) -> int:
    """Events of the write store whose outbox row is gone, i.e. that the relay published."""
    stored, unpublished = await asyncio.to_thread(stored_and_unpublished, engine)
    return stored - unpublished


def with_wallet(payment_events: int) -> int:
    """The events written with ``payment_events`` events of ``create_payments``' balance
    payments and refunds (each moved the payer's wallet too), and the payer's top-up."""
    return 1 + 2 * payment_events


async def snapshot(bootstrap: str, topic: str) -> Records:
    """Everything the broker holds on ``topic``, once nothing is appended to it any more (its
    end offsets stayed the same for half a second). The reported end offsets only bound the
    count from below (see ``end_offsets``), so reading goes on until a second passes without a
    new record."""
    ends = await steady(lambda: end_offsets(bootstrap, topic), for_seconds=0.5, within=15)
    records = await consume_all(bootstrap, topic, at_least=sum(ends.values()), settle=1.0)
    assert len(records) >= sum(ends.values())
    return records


async def steady(read: Callable[[], Awaitable[T]], *, for_seconds: float, within: float) -> T:
    """Wait until ``read()`` returns the same value for ``for_seconds``; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    value, since = await read(), loop.time()
    while loop.time() - since < for_seconds:
        assert loop.time() < deadline, f"still changing after {within} s"
        await asyncio.sleep(0.1)
        now = await read()
        if now != value:
            value, since = now, loop.time()
    return value


async def metric(api: httpx.AsyncClient, name: str) -> float:
    response = await api.get("/metrics")
    assert response.status_code == 200
    found = re.search(rf"^{re.escape(name)} (\S+)$", response.text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def fault_settings(settings: Settings, broker: EmbeddedBroker, **update: object) -> Settings:
    """The test settings pointed at this test's own broker, with shorter Kafka timeouts so that
    a dead broker is noticed in about a second."""
    changes: dict[str, object] = {
        "kafka_bootstrap": broker.bootstrap,
        "kafka_request_timeout_ms": 1_000,
        **update,
    }
    return settings.model_copy(update=changes)


def spawn_relay(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m command_service.relay`` as a separate process, configured by environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
    env.update(
        KESSAI_HOME=str(settings.home),
        KESSAI_WRITE_DB_URL=settings.resolved_write_db_url(),
        KESSAI_KAFKA_BOOTSTRAP=settings.resolved_kafka_bootstrap(),
        KESSAI_TOPIC=settings.topic,
        KESSAI_TOPIC_PARTITIONS=str(settings.topic_partitions),
        KESSAI_OUTBOX_SHARDS=str(settings.outbox_shards),
        KESSAI_RELAY_LEASE_SECONDS=str(settings.relay_lease_seconds),
        KESSAI_RELAY_BATCH_SIZE=str(settings.relay_batch_size),
        KESSAI_RELAY_POLL_INTERVAL_MS=str(settings.relay_poll_interval_ms),
        KESSAI_RELAY_RETRY_MAX_BACKOFF_MS=str(settings.relay_retry_max_backoff_ms),
        KESSAI_KAFKA_REQUEST_TIMEOUT_MS=str(settings.kafka_request_timeout_ms),
        KESSAI_LOG_LEVEL="INFO",
    )
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "command_service.relay"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def end_process(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Kill a relay process if it still runs; keep its log in the test's log output."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
    process.wait(timeout=10)
    if log_path.exists():
        log.warning("%s:\n%s", log_path.name, log_path.read_text(errors="replace")[-4000:])


# -- 1. the broker is down while payments keep coming ---------------------------------------


@pytest.mark.slow
async def test_broker_down_while_payments_are_taken_then_a_new_broker_gets_everything(
    api: httpx.AsyncClient,
    settings: Settings,
    write_engine: Engine,
    reader: Engine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker dies under a relay with a live producer; the API keeps taking payments and
    refunds (the backlog shows in /metrics) while the relay keeps retrying; a new, empty broker
    on the same address then receives every event, in order."""
    with own_broker(tmp_path) as broker:
        fault = fault_settings(settings, broker)
        async with running(Relay(engine=write_engine, settings=fault, owner="relay-1")) as relays:
            # The relay has a live producer on the first broker when that broker dies.
            await create_payments(api, 1)
            await wait_drained(reader, relays=relays, within=15)
            first_life = await snapshot(broker.bootstrap, fault.topic)
            assert len(first_life) == with_wallet(1)  # the top-up, the payment, its debit

            broker.kill()
            caplog.clear()
            created = await create_payments(api, 1000, refunded=100)
            assert len(created) == 1000
            assert sum(created.values()) == 1000 + 150  # 50 with one refund, 50 with two
            backlog = 2 * sum(created.values())  # each moved the payer's wallet too
            # Meanwhile the relay kept trying, and failing, without giving up.
            relays[0].check()
            retries = [r for r in caplog.records if "relay round failed" in r.getMessage()]
            assert retries, "the relay did not try to publish while the broker was down"
            assert (await asyncio.to_thread(count_rows, reader))["outbox"] == backlog
            assert await metric(api, "kessai_outbox_backlog") == backlog
            assert await metric(api, "kessai_outbox_oldest_age_seconds") > 0

            restart_on_same_port(broker)
            await wait_drained(reader, relays=relays, within=30)

        assert await metric(api, "kessai_outbox_backlog") == 0
        second_life = await consume_all(broker.bootstrap, fault.topic, at_least=backlog)
        assert_streams_delivered_in_order(reader, first_life, second_life)


# -- 2. the relay dies between publish and delete -------------------------------------------


class Crash(Exception):
    """The relay process dying right after Kafka acknowledged a batch, before the delete."""


class CrashAfterPublish:
    """An ``after_publish`` hook: lets ``rounds`` rounds through, then crashes the next one.
    Remembers what that last round published but will never delete, and when it crashed."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.deleted = 0
        self.stranded: list[tuple[uuid.UUID, int]] = []
        self.crashed_at: datetime | None = None

    async def __call__(self, rows: Sequence[outbox_sql.OutboxRow]) -> None:
        if self.rounds == 0:
            self.stranded = [(r.payment_id, r.version) for r in rows]
            self.crashed_at = utcnow()
            raise Crash
        self.rounds -= 1
        self.deleted += len(rows)


class Recorder:
    """An ``after_publish`` hook that only records: when each batch was acknowledged, and the
    outbox shards of its rows."""

    def __init__(self, settings: Settings) -> None:
        self.shards = settings.outbox_shards
        self.batches: list[tuple[datetime, set[int]]] = []
        self.rows = 0

    async def __call__(self, rows: Sequence[outbox_sql.OutboxRow]) -> None:
        self.batches.append((utcnow(), {shard_of(r.payment_id, self.shards) for r in rows}))
        self.rows += len(rows)

    def shards_published(self, since: datetime | None = None) -> set[int]:
        return {s for at, shards in self.batches if since is None or at >= since for s in shards}


class DyingRelay(Relay):
    """A relay whose process dies with the crash: none of its cleanup runs, so its leases stay
    taken until they lapse. (Its producer is still closed, as the OS would close its sockets.)"""

    async def close(self) -> None:
        await self._drop_producer()


@pytest.mark.slow
@pytest.mark.parametrize("death", ["exception", "process"])
async def test_relay_crash_between_publish_and_delete_loses_nothing(
    api: httpx.AsyncClient,
    settings: Settings,
    write_engine: Engine,
    reader: Engine,
    death: str,
) -> None:
    """``exception``: the crash propagates out of ``Relay.run``, whose ``finally`` still closes
    the relay and so releases its leases; a successor starts at once. ``process``: the process
    is gone, nothing is released, and a successor must wait for the leases to lapse."""
    s = settings.model_copy(update={"relay_batch_size": 50, "relay_lease_seconds": 2.0})
    created = await create_payments(api, 300, refunded=100)
    total = with_wallet(sum(created.values()))
    assert await stored_count(reader) == total

    crash = CrashAfterPublish(rounds=3)
    relay_class = DyingRelay if death == "process" else Relay
    first = RunningRelay(
        relay_class(engine=write_engine, settings=s, owner="first", after_publish=crash)
    )
    with pytest.raises(Crash):
        await asyncio.wait_for(first.task, 30)
    assert crash.deleted == 3 * 50
    assert len(crash.stranded) == 50
    assert (await asyncio.to_thread(count_rows, reader))["outbox"] == total - crash.deleted

    leases = await asyncio.to_thread(lease_table, reader)
    assert len(leases) == s.outbox_shards
    if death == "exception":
        assert all(owner is None for owner, _ in leases.values()), leases
    else:
        assert crash.crashed_at is not None
        assert all(owner == "first" for owner, _ in leases.values()), leases
        assert all(exp is not None and exp > crash.crashed_at for _, exp in leases.values())

    recorder = Recorder(s)
    async with running(
        Relay(engine=write_engine, settings=s, owner="second", after_publish=recorder)
    ) as relays:
        await wait_drained(reader, relays=relays, within=20)

    assert crash.crashed_at is not None
    assert recorder.batches
    if death == "exception":
        # Released leases are taken at once, not after the lease time.
        first_publish = recorder.batches[0][0]
        assert (first_publish - crash.crashed_at).total_seconds() < s.relay_lease_seconds / 2
    else:
        # Nothing of a shard is published before the dead relay's lease on it lapsed.
        for at, shards in recorder.batches:
            for shard in shards:
                expires = leases[shard][1]
                assert expires is not None
                assert at >= expires, (shard, at, expires)

    records = await consume_all(s.resolved_kafka_bootstrap(), s.topic, at_least=total + 50)
    copies = assert_streams_delivered_in_order(reader, records, may_repeat=crash.stranded)
    # Exactly the rows of the crashed round went out twice: published, never deleted, redone.
    assert all(copies[event] == 2 for event in crash.stranded)
    assert sum(copies.values()) == total + len(crash.stranded)


# -- 3. the relay process is SIGKILLed mid-stream -------------------------------------------


@pytest.mark.slow
async def test_relay_process_sigkilled_mid_stream_loses_nothing(
    api: httpx.AsyncClient, settings: Settings, reader: Engine, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"relay_lease_seconds": 2.0})
    logs = [tmp_path / "relay-1.log", tmp_path / "relay-2.log"]
    processes: list[subprocess.Popen[bytes]] = []
    creating = asyncio.create_task(create_payments(api, 3000, refunded=300))
    try:
        processes.append(spawn_relay(s, logs[0]))

        async def streaming() -> bool:
            if creating.done():
                creating.result()  # surface a failed request
            return await published_count(reader) >= 500

        # Deadlines against a hang, not measures of speed: a loaded machine takes its time.
        await eventually(streaming, within=60, interval=0.05)
        assert processes[0].poll() is None
        assert not creating.done(), "payments were created too fast to kill mid-stream"
        processes[0].send_signal(signal.SIGKILL)
        assert processes[0].wait(timeout=10) == -signal.SIGKILL
        published_before = await published_count(reader)

        processes.append(spawn_relay(s, logs[1]))
        created = await asyncio.wait_for(creating, 180)
        assert sum(created.values()) == 3000 + 450
        total = with_wallet(sum(created.values()))
        assert await stored_count(reader) == total
        assert published_before < total
        await wait_drained(reader, processes=processes[1:], within=90)

        processes[1].send_signal(signal.SIGTERM)  # a clean stop releases the leases
        assert processes[1].wait(timeout=20) == 0
        leases = await asyncio.to_thread(lease_table, reader)
        assert all(owner is None for owner, _ in leases.values()), leases
    finally:
        creating.cancel()
        with contextlib.suppress(BaseException):
            await creating
        for process, path in zip(processes, logs, strict=False):
            end_process(process, path)

    records = await consume_all(s.resolved_kafka_bootstrap(), s.topic, at_least=total)
    copies = assert_streams_delivered_in_order(reader, records)
    # Only the killed relay's last round can have gone out without being deleted.
    assert sum(n - 1 for n in copies.values()) <= s.relay_batch_size


# -- 4. two relays on one store --------------------------------------------------------------


def split_leases(engine: Engine, settings: Settings, owners: Sequence[str]) -> dict[str, set[int]]:
    """Give each owner a live lease on an equal share of the shards. (A relay takes every free
    shard it finds and keeps renewing them, so of two relays started one after the other the
    second would only stand by; seeding the leases makes both publish at once.) Returns
    owner -> its shards."""
    expires = utcnow() + timedelta(seconds=settings.relay_lease_seconds)
    shares = {
        owner: {s for s in range(settings.outbox_shards) if s % len(owners) == i}
        for i, owner in enumerate(owners)
    }
    with engine.begin() as conn:
        conn.execute(
            relay_leases.insert(),
            [
                {"shard": shard, "owner": owner, "expires_at": expires}
                for owner, shards in shares.items()
                for shard in shards
            ],
        )
    return shares


@pytest.mark.slow
async def test_two_relays_publish_exactly_once_and_a_clean_stop_hands_over_at_once(
    api: httpx.AsyncClient, settings: Settings, write_engine: Engine, reader: Engine
) -> None:
    # A long lease, so that "took over without waiting for expiry" is unambiguous, also on a
    # loaded machine where the hand-over itself takes seconds.
    s = settings.model_copy(update={"relay_batch_size": 100, "relay_lease_seconds": 60.0})
    shares = split_leases(write_engine, s, ["relay-a", "relay-b"])
    seen = {"relay-a": Recorder(s), "relay-b": Recorder(s)}
    relay_a, relay_b = (
        Relay(engine=write_engine, settings=s, owner=owner, after_publish=seen[owner])
        for owner in ("relay-a", "relay-b")
    )
    async with running(relay_a, relay_b) as (run_a, run_b):
        created = await create_payments(api, 2000, refunded=200)
        total = with_wallet(sum(created.values()))
        await wait_drained(reader, relays=(run_a, run_b), within=90)
        assert await stored_count(reader) == total
        # Both published, each only the shards it holds.
        for owner, recorder in seen.items():
            assert recorder.rows > 0, owner
            assert recorder.shards_published() <= shares[owner], owner
        assert seen["relay-a"].rows + seen["relay-b"].rows == total
        records = await consume_all(s.resolved_kafka_bootstrap(), s.topic, at_least=total)
        assert_streams_delivered_in_order(reader, records, exactly_once=True)

        # relay-a stops cleanly: its leases are released and relay-b takes them over at once.
        await run_a.stop()
        leases = await asyncio.to_thread(lease_table, reader)
        assert not any(owner == "relay-a" for owner, _ in leases.values()), leases
        stopped_at = utcnow()
        more = await create_payments(api, 100, refunded=20)
        await wait_drained(reader, relays=(run_b,), within=20)
        handed_over = (utcnow() - stopped_at).total_seconds()
        assert handed_over < s.relay_lease_seconds / 3, handed_over
        assert seen["relay-b"].shards_published(since=stopped_at) >= shares["relay-a"]
        leases = await asyncio.to_thread(lease_table, reader)
        assert all(owner == "relay-b" for owner, _ in leases.values()), leases

    total += 2 * sum(more.values())  # the same payer: its wallet moved with each of them
    assert await stored_count(reader) == total
    records = await consume_all(s.resolved_kafka_bootstrap(), s.topic, at_least=total)
    assert_streams_delivered_in_order(reader, records, exactly_once=True)
    assert len(records) == total


async def test_two_relays_starting_together_split_nothing_and_publish_once(
    api: httpx.AsyncClient, settings: Settings, write_engine: Engine, reader: Engine
) -> None:
    """Two relays starting on a store with no lease rows yet race to create them; each shard
    ends up with exactly one owner and every event goes out once."""
    created = await create_payments(api, 300, refunded=60)
    total = with_wallet(sum(created.values()))
    relays = [Relay(engine=write_engine, settings=settings, owner=f"relay-{n}") for n in (1, 2)]
    async with running(*relays) as started:
        await wait_drained(reader, relays=started, within=20)
        leases = await asyncio.to_thread(lease_table, reader)
    assert sorted(leases) == list(range(settings.outbox_shards))
    records = await consume_all(settings.resolved_kafka_bootstrap(), settings.topic, at_least=total)
    assert_streams_delivered_in_order(reader, records, exactly_once=True)


# -- 5. sending fails mid-stream --------------------------------------------------------------


@pytest.mark.slow
async def test_broker_killed_with_a_batch_in_flight_then_restarted_keeps_order(
    api: httpx.AsyncClient, settings: Settings, reader: Engine, tmp_path: Path
) -> None:
    """The broker dies while the relay waits for the acknowledgement of a batch, and comes
    back empty; the relay must send everything it did not see acknowledged to the new broker.

    To know exactly what the dead broker held: the relay (a process) is frozen at an arbitrary
    point of its stream and the broker's log is read in full; then the broker is frozen and the
    relay thawed, so that its next batch goes out but is never answered; then the frozen broker
    is killed, a new one started on the same port, and the relay carries on by itself.
    """
    with own_broker(tmp_path) as broker:
        s = fault_settings(settings, broker, relay_batch_size=50, relay_lease_seconds=2.0)
        created = await create_payments(api, 1500, refunded=300)
        total = with_wallet(sum(created.values()))
        assert await stored_count(reader) == total
        log_path = tmp_path / "relay.log"
        relay = spawn_relay(s, log_path)
        try:

            async def streaming() -> bool:
                assert relay.poll() is None, f"relay exited with {relay.returncode}"
                return await published_count(reader) >= 200

            await eventually(streaming, within=20, interval=0.02)
            relay.send_signal(signal.SIGSTOP)
            first_life = await snapshot(broker.bootstrap, s.topic)

            assert broker.process is not None
            broker.process.send_signal(signal.SIGSTOP)
            relay.send_signal(signal.SIGCONT)
            # The relay deletes what it saw acknowledged before it was frozen (an answer that
            # came while it was frozen may count as timed out instead), sends its next batch
            # and waits for an answer that never comes.
            stuck_at = await steady(lambda: published_count(reader), for_seconds=0.5, within=10)
            assert stuck_at < total, "the relay published everything before the broker froze"
            assert relay.poll() is None
            deleted = set(await asyncio.to_thread(stored_stream_events, reader))
            deleted -= await asyncio.to_thread(unpublished_events, reader)

            broker.kill()
            restart_on_same_port(broker)
            # The topic exists before the relay's next send, as on a real cluster, where topics
            # outlive a broker restart. (The relay reconnects without noticing the restart and
            # may send at once; a fresh embedded broker that does not know the topic yet can lose
            # a few records it acknowledges in that first instant.)
            await ensure_topic(broker.bootstrap, s.topic, partitions=s.topic_partitions)
            await wait_drained(reader, processes=[relay], within=30)
        finally:
            end_process(relay, log_path)
        delivered_before = {published_stream_event(r) for r in first_life}
        assert len(delivered_before) == len(first_life)
        # Nothing was deleted from the outbox that the dead broker did not hold.
        assert deleted <= delivered_before
        second_life = await consume_all(
            broker.bootstrap, s.topic, at_least=total - len(delivered_before), within=30
        )
    # Copies only of what the dead broker held without the relay knowing it.
    assert_streams_delivered_in_order(
        reader, first_life, second_life, may_repeat=delivered_before - deleted
    )


@pytest.mark.slow
async def test_broker_stalled_mid_stream_then_resumed_keeps_order(
    api: httpx.AsyncClient,
    settings: Settings,
    write_engine: Engine,
    reader: Engine,
    tmp_path: Path,
) -> None:
    """The broker stops answering mid-stream for longer than the send timeout, then resumes
    with its log intact. The relay's sends time out, it gives up its producer and retries; the
    requests it gave up on may still be appended once the broker wakes, so copies are expected,
    but every event is there and each payment's first copies are in version order."""
    with own_broker(tmp_path) as broker:
        s = fault_settings(settings, broker, relay_batch_size=50)
        created = await create_payments(api, 1500, refunded=300)
        total = with_wallet(sum(created.values()))
        assert await stored_count(reader) == total
        async with running(Relay(engine=write_engine, settings=s, owner="relay-1")) as relays:

            async def streaming() -> bool:
                relays[0].check()
                return await published_count(reader) >= 200

            await eventually(streaming, within=20, interval=0.02)
            assert broker.process is not None
            broker.process.send_signal(signal.SIGSTOP)
            stalled_at = await steady(lambda: published_count(reader), for_seconds=0.5, within=10)
            assert stalled_at < total
            # Stay stalled past the relay's send timeout (2 x the 1 s request timeout), so that
            # it gives up on the batches it sent and retries them.
            await asyncio.sleep(2.5)
            assert await published_count(reader) == stalled_at
            broker.process.send_signal(signal.SIGCONT)
            await wait_drained(reader, relays=relays, within=30)

        records = await consume_all(broker.bootstrap, s.topic, at_least=total)
    assert_streams_delivered_in_order(reader, records)
