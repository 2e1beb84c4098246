"""The fault campaign: the whole pipeline on MariaDB and the real broker, under a fault.

Each scenario takes a few thousand payments and refunds through the real command handlers
(merchant m0 has a third of the traffic; some payments get two refunds; the balance payments
and their refunds move their payers' wallets, each a stream of its own on the same topic), with
the relay and the projector running, and injects its fault while that traffic flows. When the
pipeline has come to rest, the test works out what drifted by itself (every payment whose read
state differs from the fold of its events, every wallet whose balance or statement differs from
the fold of its movements, or that has parked events or an open dead letter), runs the
reconciler, and asserts:

- the reconciler reports exactly the drifted payments and wallets: none missed, none invented;
- it repairs every one of them (exit code 0), and afterwards the read side equals the fold of
  the write store exactly: every payment's state and version, every refund row, every
  merchant's daily and hourly totals, every wallet's balance and statement;
- a full audit right after finds nothing at all.

Faults the pipeline absorbs by itself (a relay dying between publish and delete, a projector
killed mid-batch) must leave no drift, and the reconciler must then report none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

import projector.apply
from command_service import outbox as outbox_sql
from command_service.relay import Relay
from kessai.broker import log_ends
from kessai.clock import utcnow
from kessai.events import SCHEMA_VERSION, PaymentRefunded, parse_event, wallet_stream_id
from kessai.schema.read import (
    dead_letters,
    merchant_daily_totals,
    parked_events,
    payments,
    projector_offsets,
    refunds,
)
from kessai.schema.write import events, outbox, wallet_events
from kessai.settings import Settings
from kessai_cli.main import app
from projector.service import Projector
from reconciler.service import PAYMENT_KINDS, Reconciler, RunResult
from tests.helpers import own_broker, restart_on_same_port
from tests.integration.read_model import captured
from tests.integration.read_model import project as apply_directly
from tests.pipeline import (
    Traffic,
    assert_read_side_matches,
    assert_wallets_match,
    expected_wallets,
    fold_by_payment,
    make_traffic,
    read_wallets,
    write_store_events,
    write_store_wallet_events,
)

pytestmark = pytest.mark.slow

PAYMENTS = 2_000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend() -> str:
    """The campaign runs on MariaDB: the production shape of both databases."""
    return "mysql"


@pytest.fixture
def csettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.5,
            "reconcile_verify_timeout_seconds": 60.0,
            "reconcile_outbox_stuck_seconds": 1.0,
            "reconcile_chunk_size": 500,
        }
    )


# -- plumbing ---------------------------------------------------------------------------------


def count(engine: Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


class Component:
    """A relay or projector running as a task of this loop, stoppable and restartable."""

    def __init__(self, make: Callable[[], Relay | Projector]) -> None:
        self.make = make
        self.instance = make()
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.create_task(self.instance.run(self.stop_event))

    def check(self) -> None:
        if self.task.done():
            self.task.result()
            raise AssertionError(f"{type(self.instance).__name__} stopped by itself")

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)

    async def restart(self) -> None:
        if not self.task.done():
            await self.stop()
        self.instance = self.make()
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.instance.run(self.stop_event))


@contextlib.asynccontextmanager
async def components(
    *makers: Callable[[], Relay | Projector],
) -> AsyncIterator[list[Component]]:
    started = [Component(make) for make in makers]
    try:
        yield started
    finally:
        for c in started:
            c.stop_event.set()
        await asyncio.wait_for(
            asyncio.gather(*(c.task for c in started), return_exceptions=True), 30
        )


async def until(
    check: Callable[[], bool],
    *,
    within: float = 120.0,
    alive: Sequence[Component] = (),
) -> None:
    """Poll ``check`` (in a thread: it queries databases) until true; fail fast if a component
    that must stay up dies."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await asyncio.to_thread(check):
        for c in alive:
            c.check()
        assert loop.time() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.1)


def start_traffic(write: Engine, seed: int) -> asyncio.Task[Traffic]:
    """Payments and refunds written from a worker thread while the test goes on."""
    return asyncio.create_task(
        asyncio.to_thread(
            make_traffic,
            write,
            payments_count=PAYMENTS,
            refund_share=0.3,
            second_refund_share=0.3,
            seed=seed,
        )
    )


def written(write: Engine) -> int:
    """Events written, payments' and wallets' (each has an outbox row until published)."""
    return count(write, events) + count(write, wallet_events)


def applied_offsets(read: Engine, topic: str) -> dict[int, int]:
    with read.connect() as conn:
        rows = conn.execute(
            sa.select(projector_offsets.c.kafka_partition, projector_offsets.c.next_offset).where(
                projector_offsets.c.topic == topic
            )
        )
        return {int(p): int(o) for p, o in rows}


async def at_rest(
    settings: Settings,
    write: Engine,
    read: Engine,
    *,
    alive: Sequence[Component] = (),
    outbox_empty: bool = True,
) -> None:
    """The relay has published everything (the outbox is empty) and the projector has applied
    every record the broker holds (its stored offsets are the ends of the log)."""
    if outbox_empty:
        await until(lambda: count(write, outbox) == 0, alive=alive)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        ends = await log_ends(
            settings.resolved_kafka_bootstrap(), settings.topic, settings.topic_partitions
        )
        applied = await asyncio.to_thread(applied_offsets, read, settings.topic)
        if all(applied.get(p, 0) == end for p, end in ends.items()):
            return
        for c in alive:
            c.check()
        assert loop.time() < deadline, f"the projector never caught up: {applied} < {ends}"
        await asyncio.sleep(0.3)


def wallet_streams(write: Engine) -> dict[uuid.UUID, str]:
    """Stream id -> user of every wallet in the write store."""
    return {wallet_stream_id(e.user_id): e.user_id for e in write_store_wallet_events(write)}


def flagged_streams(read: Engine) -> set[uuid.UUID]:
    """Streams (payments and wallets) with parked events or open dead letters."""
    with read.connect() as conn:
        flagged = set(conn.execute(sa.select(parked_events.c.payment_id)).scalars())
        flagged |= set(
            conn.execute(
                sa.select(dead_letters.c.payment_id).where(dead_letters.c.status == "open")
            ).scalars()
        )
    return {stream_id for stream_id in flagged if stream_id is not None}


def drifted_wallets(write: Engine, read: Engine) -> set[str]:
    """Users whose wallet on the read side (balance, version, statement) is not the fold of its
    movements in the write store, or whose stream has parked events or an open dead letter;
    worked out independently of the reconciler."""
    want_balances, want_lines = expected_wallets(write_store_wallet_events(write))
    balances, lines = read_wallets(read)
    differ = {
        u for u in want_balances.keys() | balances.keys() if want_balances.get(u) != balances.get(u)
    }
    differ |= {
        u
        for u, v in want_lines.keys() | lines.keys()
        if want_lines.get((u, v)) != lines.get((u, v))
    }
    users = wallet_streams(write)
    return differ | {users[s] for s in flagged_streams(read) if s in users}


def drifted(write: Engine, read: Engine) -> set[uuid.UUID]:
    """Payments whose read side is not the fold of their events, worked out independently of
    the reconciler: state, version and refund rows, parked events, open dead letters. (A
    wallet's stream is not a payment: its drift is ``drifted_wallets``.)"""
    all_events = write_store_events(write)
    expected = {
        pid: (s.captured_amount, s.refunded_amount, s.version, s.status)
        for pid, s in fold_by_payment(all_events).items()
    }
    expected_refunds: dict[uuid.UUID, list[tuple[int, int]]] = {}
    for e in all_events:
        if isinstance(e, PaymentRefunded):
            expected_refunds.setdefault(e.payment_id, []).append((e.version, e.payload.amount))
    with read.connect() as conn:
        actual = {
            row.payment_id: (row.captured_amount, row.refunded_amount, row.version, row.status)
            for row in conn.execute(sa.select(payments))
        }
        actual_refunds: dict[uuid.UUID, list[tuple[int, int]]] = {}
        for pid, version, amount in conn.execute(
            sa.select(refunds.c.payment_id, refunds.c.version, refunds.c.amount).order_by(
                refunds.c.payment_id, refunds.c.version
            )
        ):
            actual_refunds.setdefault(pid, []).append((int(version), int(amount)))
    flagged = flagged_streams(read) - wallet_streams(write).keys()
    differ = {
        pid
        for pid in expected.keys() | actual.keys()
        if expected.get(pid) != actual.get(pid)
        or expected_refunds.get(pid, []) != actual_refunds.get(pid, [])
    }
    return differ | flagged


def reported(result: RunResult) -> set[uuid.UUID]:
    """The payments the run found wrong (its findings of wallet streams are not payments')."""
    kinds = PAYMENT_KINDS | {"orphan"}
    return {
        f.payment_id
        for f in result.findings
        if f.kind in kinds and f.payment_id and f.payment_id.version != 5  # UUIDv5: a wallet
    }


def reported_wallets(result: RunResult) -> set[str]:
    """The users whose wallet the run found wrong on the read side."""
    return {
        str((f.details or {})["user_id"]) for f in result.findings if f.kind == "wallet_balance"
    }


async def reconcile_and_check(
    settings: Settings, write: Engine, read: Engine, *, expect_drift: bool
) -> RunResult:
    """The campaign's verdict, once the pipeline is at rest (the projector still running)."""
    drift = await asyncio.to_thread(drifted, write, read)
    wallet_drift = await asyncio.to_thread(drifted_wallets, write, read)
    if expect_drift:
        assert drift, "the fault left nothing to repair: it was not injected"
    else:
        assert drift == set(), "a fault the pipeline absorbs by itself left drift"
        assert wallet_drift == set(), "a fault the pipeline absorbs by itself left wallet drift"
    reconciler = Reconciler(write_engine=write, read_engine=read, settings=settings)
    result = await reconciler.run()
    assert reported(result) == drift  # none missed, none invented
    assert reported_wallets(result) == wallet_drift
    unrepaired = [f for f in result.findings if not f.repaired]
    assert unrepaired == []
    assert (result.outcome, result.exit_code) == ("consistent", 0)
    await asyncio.to_thread(assert_read_side_matches, write, read)
    await asyncio.to_thread(assert_wallets_match, write, read)
    audit = await reconciler.run(full=True)
    assert (audit.findings, audit.exit_code) == ([], 0)
    assert audit.payments_checked == count(write, events, events.c.version == 1)
    return result


def relay_of(settings: Settings, write: Engine, cls: type[Relay] = Relay) -> Callable[[], Relay]:
    return lambda: cls(engine=write, settings=settings)


def projector_of(
    settings: Settings, read: Engine, registry: CollectorRegistry | None = None
) -> Callable[[], Projector]:
    return lambda: Projector(engine=read, settings=settings, registry=registry)


# -- 1. the broker killed and restarted empty in the middle of the stream -----------------------


async def test_broker_killed_and_restarted_empty_mid_stream(
    csettings: Settings, write_engine: Engine, read_engine: Engine, tmp_path: Path
) -> None:
    with own_broker(tmp_path) as broker:
        settings = csettings.model_copy(
            update={"kafka_bootstrap": broker.bootstrap, "kafka_request_timeout_ms": 1_000}
        )
        async with components(
            relay_of(settings, write_engine), projector_of(settings, read_engine)
        ) as (relay, proj):
            traffic = start_traffic(write_engine, seed=101)
            await until(lambda: count(read_engine, payments) >= 300, alive=[relay, proj])
            # The projector falls behind (stopped for a moment) while the relay goes on
            # publishing: what the broker holds unconsumed when it dies is lost with it.
            await proj.stop()
            published = written(write_engine) - count(write_engine, outbox)
            await until(
                lambda: written(write_engine) - count(write_engine, outbox) >= published + 300,
                alive=[relay],
            )
            broker.kill()
            restart_on_same_port(broker)
            await proj.restart()
            await traffic
            await at_rest(settings, write_engine, read_engine, alive=[relay, proj])
            await reconcile_and_check(settings, write_engine, read_engine, expect_drift=True)


# -- 2. the relay killed between publishing and marking --------------------------------------


class Crash(Exception):
    """The relay dying right after the broker acknowledged a batch, before the delete."""


class DyingRelay(Relay):
    """Publishes ``rounds`` rounds, then dies in the next one after the broker acknowledged it
    and before its outbox rows were deleted. Like a killed process, it releases no leases."""

    rounds = 15

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs, after_publish=self._maybe_die)  # type: ignore[arg-type]
        self.stranded = 0

    async def _maybe_die(self, rows: Sequence[outbox_sql.OutboxRow]) -> None:
        if self.rounds == 0:
            self.stranded = len(rows)
            raise Crash
        self.rounds -= 1

    async def close(self) -> None:
        await self._drop_producer()


async def test_relay_killed_between_publishing_and_marking(
    csettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    registry = CollectorRegistry()
    dying = DyingRelay(engine=write_engine, settings=csettings)
    async with components(projector_of(csettings, read_engine, registry)) as (proj,):
        stop = asyncio.Event()
        traffic = start_traffic(write_engine, seed=102)
        with pytest.raises(Crash):
            await dying.run(stop)
        assert dying.stranded > 0
        await traffic
        # Nobody publishes now: the reconciler sees a stuck relay, and no drift in what was
        # published (payments still in the outbox are not judged).
        await at_rest(csettings, write_engine, read_engine, alive=[proj], outbox_empty=False)
        await asyncio.sleep(csettings.reconcile_outbox_stuck_seconds)
        reconciler = Reconciler(
            write_engine=write_engine, read_engine=read_engine, settings=csettings
        )
        stuck = await reconciler.run()
        assert [f.kind for f in stuck.findings] == ["outbox_stuck"]
        assert (stuck.findings[0].details or {})["rows"] == count(write_engine, outbox)
        assert stuck.exit_code == 1
        # A new relay takes over once the dead one's leases lapse, and publishes the stranded
        # batch again: the projector skips the copies.
        async with components(relay_of(csettings, write_engine)) as (relay,):
            await at_rest(csettings, write_engine, read_engine, alive=[relay, proj])
            await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=False)
    duplicates = registry.get_sample_value("kessai_projector_duplicates_total")
    assert duplicates is not None
    assert duplicates >= 1


# -- 3. the projector killed with SIGKILL mid-batch --------------------------------------------


def spawn_projector(settings: Settings, home: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")},
        "KESSAI_READ_DB_URL": settings.resolved_read_db_url(),
        "KESSAI_KAFKA_BOOTSTRAP": settings.resolved_kafka_bootstrap(),
        "KESSAI_TOPIC": settings.topic,
        "KESSAI_PROJECTOR_GROUP_ID": settings.projector_group_id,
        "KESSAI_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "KESSAI_PROJECTOR_BATCH_SIZE": "50",
        "KESSAI_HOME": str(home),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "projector"],
        cwd=REPO,
        env=env,
        stdout=(home / "projector.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextlib.contextmanager
def killed_at_the_end(*processes: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


async def test_projector_sigkilled_mid_batch(
    csettings: Settings, write_engine: Engine, read_engine: Engine, tmp_path: Path
) -> None:
    first = spawn_projector(csettings, tmp_path)
    with killed_at_the_end(first):
        async with components(relay_of(csettings, write_engine)) as (relay,):
            traffic = start_traffic(write_engine, seed=103)
            await until(lambda: count(read_engine, payments) >= 400, alive=[relay])
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
            behind = count(read_engine, payments)
            second = spawn_projector(csettings, tmp_path)
            with killed_at_the_end(second):
                await traffic
                assert behind < PAYMENTS
                await at_rest(csettings, write_engine, read_engine, alive=[relay])
                assert second.poll() is None
                await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=False)
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=30) == 0


# -- 4. read rows deleted, and read amounts altered, behind the projector's back ---------------


async def test_read_rows_deleted_and_altered_behind_the_projectors_back(
    csettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    async with components(
        relay_of(csettings, write_engine), projector_of(csettings, read_engine)
    ) as (relay, proj):
        traffic = start_traffic(write_engine, seed=104)
        await until(lambda: count(read_engine, payments) >= 600, alive=[relay, proj])
        with read_engine.begin() as conn:
            # The oldest payments: their refunds (written right after them) are applied.
            oldest = list(
                conn.execute(
                    sa.select(payments.c.payment_id).order_by(payments.c.payment_id).limit(300)
                ).scalars()
            )
            refunded = set(conn.execute(
                sa.select(refunds.c.payment_id).where(refunds.c.payment_id.in_(oldest))
            ).scalars())  # fmt: skip
            with_refunds = [p for p in oldest if p in refunded]
            plain = [p for p in oldest if p not in refunded]
            # Deleted: payments with their refund rows, one leaving its refunds behind, plain.
            deleted = [*with_refunds[:4], *plain[:6]]
            conn.execute(refunds.delete().where(refunds.c.payment_id.in_(with_refunds[:3])))
            conn.execute(payments.delete().where(payments.c.payment_id.in_(deleted)))
            altered = [*with_refunds[4:9], *plain[6:11]]
            conn.execute(
                payments.update()
                .where(payments.c.payment_id.in_(altered))
                .values(captured_amount=payments.c.captured_amount + 10)
            )
            conn.execute(
                refunds.update()
                .where(refunds.c.payment_id == with_refunds[9])
                .values(amount=refunds.c.amount + 1)
            )
            conn.execute(
                merchant_daily_totals.update()
                .where(merchant_daily_totals.c.merchant_id == "m0")
                .values(payments_amount=merchant_daily_totals.c.payments_amount + 7)
            )
        # A payment the write store never took, applied to the read side with its totals.
        invented = captured(at=utcnow(), merchant_id="m0", amount=9_999)
        apply_directly(read_engine, [invented])
        await traffic
        await at_rest(csettings, write_engine, read_engine, alive=[relay, proj])
        result = await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=True)
    assert {*deleted, *altered, with_refunds[9], invented.payment_id} <= reported(result)
    kinds = {f.kind for f in result.findings}
    assert {"missing", "mismatch", "orphan", "daily_totals"} <= kinds
    assert any(f.kind == "daily_totals" and f.merchant_id == "m0" for f in result.findings)


# -- 5. outbox rows deleted before they were published ----------------------------------------


async def test_outbox_rows_deleted_before_they_were_published(
    csettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    async with components(
        relay_of(csettings, write_engine), projector_of(csettings, read_engine)
    ) as (relay, proj):
        traffic = start_traffic(write_engine, seed=105)
        await until(lambda: written(write_engine) >= 800, alive=[relay, proj])
        await relay.stop()
        await until(lambda: count(write_engine, outbox) >= 300)
        with write_engine.begin() as conn:
            lost = conn.execute(
                sa.select(outbox.c.outbox_id, outbox.c.payment_id).where(
                    outbox.c.outbox_id % 3 == 0
                )
            ).all()
            conn.execute(outbox.delete().where(outbox.c.outbox_id.in_([i for i, _ in lost])))
        await relay.restart()
        await traffic
        await at_rest(csettings, write_engine, read_engine, alive=[relay, proj])
        result = await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=True)
    # The lost rows of payments are those payments' drift; those of wallets, their wallets'.
    users = wallet_streams(write_engine)
    assert reported(result) == {pid for _, pid in lost if pid not in users}
    assert reported_wallets(result) == {users[pid] for _, pid in lost if pid in users}


# -- 6. one version of a payment never delivered (a parked gap) --------------------------------


class LossyRelay(Relay):
    """Marks some version-2 events of payments (first refunds) published without sending them:
    lost between the relay and the projector. Which ones depends only on the event (its refund
    amount)."""

    def _fetch(self, shards: list[int]) -> list[outbox_sql.OutboxRow]:
        rows = super()._fetch(shards)
        lost = [
            r
            for r in rows
            if r.version == 2 and r.event_type == "PaymentRefunded" and _refund_amount(r) % 9 == 0
        ]
        if lost:
            self._mark([r.outbox_id for r in lost])
            LossyRelay.lost.extend((r.payment_id, r.version) for r in lost)
        return [r for r in rows if r not in lost]

    lost: ClassVar[list[tuple[uuid.UUID, int]]] = []


def _refund_amount(row: outbox_sql.OutboxRow) -> int:
    event = parse_event(row.body)
    assert isinstance(event, PaymentRefunded)
    return event.payload.amount


async def test_a_version_never_delivered_is_parked_then_filled(
    csettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    LossyRelay.lost = []
    async with components(
        relay_of(csettings, write_engine, LossyRelay), projector_of(csettings, read_engine)
    ) as (relay, proj):
        traffic = start_traffic(write_engine, seed=106)
        await traffic
        await at_rest(csettings, write_engine, read_engine, alive=[relay, proj])
        result = await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=True)
    assert reported(result) == {pid for pid, _ in LossyRelay.lost}
    parked = [f for f in result.findings if f.kind == "parked"]
    assert parked, "no lost version had a later one behind it"
    assert all((f.details or {})["version"] == 3 for f in parked)


# -- 7. a poison event in the dead letters, fixed and retried ------------------------------------


class PoisonRelay(Relay):
    """Publishes some refunds in a form this projector cannot read: a few under a newer schema
    version (a writer deployed ahead of the projector), a few mangled in transit."""

    newer: ClassVar[list[uuid.UUID]] = []
    mangled: ClassVar[list[uuid.UUID]] = []

    def _fetch(self, shards: list[int]) -> list[outbox_sql.OutboxRow]:
        rows = super()._fetch(shards)
        out = []
        for r in rows:
            first_refund = r.version == 2 and r.event_type == "PaymentRefunded"
            if first_refund and len(PoisonRelay.newer) < 3:
                PoisonRelay.newer.append(r.payment_id)
                r = dataclasses.replace(r, schema_version=SCHEMA_VERSION + 1)
            elif first_refund and len(PoisonRelay.mangled) < 3:
                PoisonRelay.mangled.append(r.payment_id)
                r = dataclasses.replace(r, body=r.body[: len(r.body) // 2])
            out.append(r)
        return out


async def test_poison_events_dead_lettered_then_fixed_and_retried(
    csettings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    PoisonRelay.newer, PoisonRelay.mangled = [], []
    monkeypatch.setenv("KESSAI_READ_DB_URL", csettings.resolved_read_db_url())
    monkeypatch.setenv("COLUMNS", "200")
    cli = CliRunner()
    async with components(
        relay_of(csettings, write_engine, PoisonRelay), projector_of(csettings, read_engine)
    ) as (relay, proj):
        traffic = start_traffic(write_engine, seed=107)
        await traffic
        await at_rest(csettings, write_engine, read_engine, alive=[relay, proj])
        poisoned = {*PoisonRelay.newer, *PoisonRelay.mangled}
        assert len(poisoned) == 6
        listed = await asyncio.to_thread(cli.invoke, app, ["dead-letters", "list"])
        assert "6 dead letter(s)" in listed.output, listed.output
        # The fix: a projector that reads the newer schema is deployed, and the operator
        # retries every open letter. The mangled ones still fail: nothing can read them.
        monkeypatch.setattr(projector.apply, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        retried = await asyncio.to_thread(cli.invoke, app, ["dead-letters", "retry", "--all"])
        assert retried.exit_code == 1, retried.output
        assert await asyncio.to_thread(drifted, write_engine, read_engine) == set(
            PoisonRelay.mangled
        )
        # The reconciler re-publishes the mangled payments from the write store: the intact
        # copies supersede the dead letters.
        result = await reconcile_and_check(csettings, write_engine, read_engine, expect_drift=True)
    assert reported(result) == set(PoisonRelay.mangled)
    assert {f.kind for f in result.findings} >= {"dead_letter"}
    assert count(read_engine, dead_letters, dead_letters.c.status == "open") == 0
