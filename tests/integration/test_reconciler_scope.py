"""What a run may claim and what it may rewrite, when read rows are damaged on both sides of its
watermark: an incremental run checks only events recorded after it, so it must say so, and it
must never turn a right merchant total into a wrong one; the scheduled full audit repairs the
rest.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.schema.read import merchant_hourly_totals, merchants, payments, refunds
from kessai.schema.write import outbox
from kessai.settings import Settings
from projector.service import Projector
from reconciler.compare import time_of
from reconciler.service import Reconciler, RunResult
from tests.integration.test_reconciler import count, kinds
from tests.pipeline import (
    assert_read_side_matches,
    make_traffic,
    read_payments,
    read_side_matches,
    read_totals,
    running,
    wait_until,
    wallets_match,
)


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
            "reconcile_chunk_size": 7,
        }
    )


@pytest.fixture
def reconciler(rsettings: Settings, write_engine: Engine, read_engine: Engine) -> Reconciler:
    return Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)


def settled(write_engine: Engine, read_engine: Engine) -> bool:
    """Everything published and projected: payments, totals and wallets (the reconciler checks
    the wallets too)."""
    return (
        count(write_engine, outbox) == 0
        and read_side_matches(write_engine, read_engine)
        and wallets_match(write_engine, read_engine)
    )


def damage(
    read_engine: Engine, payment_ids: list[uuid.UUID]
) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """Behind the projector's back: rows deleted (one with its refunds, one leaving them behind,
    one plain) and amounts altered. Returns (deleted, altered)."""
    with read_engine.connect() as conn:
        refunded = set(
            conn.execute(
                sa.select(refunds.c.payment_id).where(refunds.c.payment_id.in_(payment_ids))
            ).scalars()
        )
    with_refunds = [p for p in payment_ids if p in refunded]
    plain = [p for p in payment_ids if p not in refunded]
    deleted = [with_refunds[0], with_refunds[1], plain[0]]
    altered = [with_refunds[2], plain[1], plain[2]]
    with read_engine.begin() as conn:
        conn.execute(refunds.delete().where(refunds.c.payment_id == with_refunds[0]))
        conn.execute(payments.delete().where(payments.c.payment_id.in_(deleted)))
        conn.execute(
            payments.update()
            .where(payments.c.payment_id.in_(altered))
            .values(captured_amount=payments.c.captured_amount + 13)
        )
    return set(deleted), set(altered)


async def test_an_incremental_run_never_makes_a_right_total_wrong_and_says_what_it_checked(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        old = await asyncio.to_thread(
            make_traffic, write_engine, payments_count=24, refund_share=0.5, seed=41
        )
        await wait_until(lambda: settled(write_engine, read_engine), tasks=tasks)
        await asyncio.sleep(1.0)  # older than the next run's start minus the margin (0.5 s)
        first = await reconciler.run()
        assert (first.exit_code, first.scope) == (0, "everything")
        recent = await asyncio.to_thread(
            make_traffic, write_engine, payments_count=24, refund_share=0.5, seed=42
        )
        await wait_until(lambda: settled(write_engine, read_engine), tasks=tasks)
        right_totals = read_totals(read_engine)
        old_deleted, old_altered = damage(read_engine, old.payment_ids)
        recent_deleted, recent_altered = damage(read_engine, recent.payment_ids)
        damaged_old_rows = {
            pid: row for pid, row in read_payments(read_engine).items() if pid in old_altered
        }

        second = await reconciler.run()
        assert not [f for f in second.findings if not f.repaired]

        # The totals were right; whatever the run saw, they still are.
        assert read_totals(read_engine) == right_totals
        # It checked, and repaired, the recent payments only, and says that is all it checked.
        assert kinds(second).get("missing", 0) + kinds(second).get("mismatch", 0) == 6
        found = {f.payment_id for f in second.findings if f.kind in ("missing", "mismatch")}
        assert found == recent_deleted | recent_altered
        assert second.watermark_from == first.watermark_to
        # "consistent" is within its scope, which it states: the old payments were not checked.
        assert (second.outcome, second.exit_code) == ("consistent", 0)
        assert second.scope != "everything"
        assert second.scope.startswith("events recorded after ")
        assert time_of(first.watermark_to)[:16] in second.scope.replace("T", " ")
        rows = read_payments(read_engine)
        assert old_deleted.isdisjoint(rows)
        assert {pid: rows[pid] for pid in old_altered} == damaged_old_rows

        # The scheduled full audit (due at once: none has run yet) repairs the rest.
        stop = asyncio.Event()
        seen: list[RunResult] = []

        def on_result(result: RunResult) -> None:
            seen.append(result)
            stop.set()

        await asyncio.wait_for(
            reconciler.run_every(3600, stop, full_audit_every=3600, on_result=on_result),
            timeout=60,
        )
    (audit,) = seen
    assert (audit.mode, audit.scope, audit.exit_code) == ("full", "everything", 0)
    found = {f.payment_id for f in audit.findings if f.kind in ("missing", "mismatch")}
    assert found == old_deleted | old_altered
    assert_read_side_matches(write_engine, read_engine)


async def test_totals_in_zones_off_the_whole_hour_are_checked_exactly(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    """The write store sums events per UTC quarter hour: exact for Kolkata (+5:30) and
    St John's (-3:30) as for Tokyo."""
    with read_engine.begin() as conn:
        conn.execute(
            merchants.insert(),
            [
                {"merchant_id": "m1", "time_zone": "Asia/Kolkata"},
                {"merchant_id": "m2", "time_zone": "America/St_Johns"},
            ],
        )
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await asyncio.to_thread(make_traffic, write_engine, payments_count=30, seed=43)
        await wait_until(lambda: count(write_engine, outbox) == 0, tasks=tasks)
        await wait_until(lambda: count(read_engine, payments) == 30, tasks=tasks)
        clean = await reconciler.run(full=True)
        assert (clean.findings, clean.exit_code) == ([], 0)
        with read_engine.begin() as conn:
            bumped = conn.execute(
                merchant_hourly_totals.update()
                .where(merchant_hourly_totals.c.merchant_id == "m1")
                .values(payments_amount=merchant_hourly_totals.c.payments_amount + 5)
            ).rowcount
        repaired = await reconciler.run(full=True)
    assert bumped >= 1
    assert [(f.kind, f.merchant_id, f.repaired) for f in repaired.findings] == [
        ("hourly_totals", "m1", True)
    ] * bumped
    assert (await reconciler.run(full=True)).findings == []
