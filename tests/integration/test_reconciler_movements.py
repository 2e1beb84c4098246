"""Every payment that moves a wallet has its movement in the write store: a captured balance
payment its ``WalletDebited``, a refund of one its ``WalletCredited``, of the amount its postings
say. A movement lost behind the service's back is drift no re-publishing can repair: the run
reports it (``wallet_movement``) and exits 1.

Against the real pipeline (write store, relay, broker, projector, read database), with the
fixtures of ``test_reconciler_wallets``. The movements are lost before they are published, so
the read side agrees with the write store and the only thing wrong is the missing movement.
"""

from __future__ import annotations

import asyncio
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
from kessai.events import wallet_stream_id
from kessai.ids import bound_at, new_id
from kessai.schema.read import reconciliation_findings
from kessai.schema.write import outbox, wallet_events
from kessai.settings import Settings
from reconciler import records
from reconciler.records import Finding
from reconciler.service import Reconciler
from tests.helpers import fund
from tests.integration import test_reconciler_wallets as wallet_tests
from tests.integration.test_reconciler_wallets import kinds, with_pipeline
from tests.pipeline import make_traffic

rsettings = wallet_tests.rsettings
reconciler = wallet_tests.reconciler


def _policy() -> handlers.WritePolicy:
    return handlers.WritePolicy(
        client_id="test",
        idempotency_key=f"k-{new_id()}",
        retention=timedelta(hours=1),
        shards=8,
        max_attempts=30,
    )


def pay(engine: Engine, user_id: str, amount: int, merchant_id: str = "m1") -> uuid.UUID:
    """A balance payment through the command handlers (its debit written with it)."""
    outcome = handlers.record_alone(
        engine,
        capture_command(
            policy=_policy(),
            command=CreatePayment(
                merchant_id=merchant_id, user_id=user_id, amount=amount, method="balance"
            ),
            device_id=None,
        ),
    )
    return uuid.UUID(orjson.loads(outcome.body)["payment_id"])


def refund(engine: Engine, payment_id: uuid.UUID, amount: int) -> uuid.UUID:
    outcome = handlers.record_alone(
        engine,
        refund_command(
            policy=_policy(), payment_id=payment_id, command=CreateRefund(amount=amount)
        ),
    )
    return uuid.UUID(orjson.loads(outcome.body)["refund_id"])


def lose_newest_movement(engine: Engine, user_id: str) -> int:
    """The wallet's newest movement deleted from the write store, with its outbox row (never
    published): what no write path does. The store refuses deletes (a trigger), so the
    trigger goes first. Returns the version lost."""
    w = wallet_events.c
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER IF EXISTS wallet_events_refuse_delete"))
    with engine.begin() as conn:
        version = int(
            conn.execute(sa.select(sa.func.max(w.version)).where(w.user_id == user_id)).scalar_one()
        )
        conn.execute(wallet_events.delete().where(w.user_id == user_id, w.version == version))
        conn.execute(
            outbox.delete().where(
                outbox.c.payment_id == wallet_stream_id(user_id), outbox.c.version == version
            )
        )
    return version


def movement_findings(findings: list[Finding]) -> dict[uuid.UUID | None, Finding]:
    return {f.payment_id: f for f in findings if f.kind == "wallet_movement"}


def lost(user_id: str, *, version: int, expected: int, refund_id: uuid.UUID | None) -> dict:
    what = "payment" if refund_id is None else "refund"
    return {
        "user_id": user_id,
        "version": version,
        "refund_id": None if refund_id is None else str(refund_id),
        "expected": expected,
        "found": None,
        "wallet_versions": [],
        "problem": f"the {what} moves wallet {user_id}, which holds no movement of it",
    }


@pytest.mark.breaks_the_ledger
async def test_a_payment_or_refund_without_its_wallet_movement_is_drift(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=11)
    fund(write_engine, "ua", "ub")
    paid = pay(write_engine, "ua", 700)
    kept = pay(write_engine, "ub", 900, merchant_id="m2")
    refund_id = refund(write_engine, kept, 300)
    lose_newest_movement(write_engine, "ua")  # the debit of the payment
    lose_newest_movement(write_engine, "ub")  # the credit of the refund; the debit stays

    async def reconcile() -> None:
        result = await reconciler.run()
        assert kinds(result) == {"wallet_movement": 2}, result.findings
        found = movement_findings(result.findings)
        assert found[paid].details == lost("ua", version=1, expected=-700, refund_id=None)
        assert found[paid].merchant_id == "m1"
        assert found[kept].details == lost("ub", version=2, expected=300, refund_id=refund_id)
        assert found[kept].merchant_id == "m2"
        assert not any(f.repaired for f in result.findings)  # the write store is the truth
        assert (result.outcome, result.exit_code) == ("drift", 1)
        rf = reconciliation_findings.c
        with read_engine.connect() as conn:
            stored = conn.execute(
                sa.select(rf.kind, rf.details).where(rf.run_id == result.run_id)
            ).all()
        assert sorted(kind for kind, _ in stored) == ["wallet_movement"] * 2
        assert {orjson.loads(d)["user_id"] for _, d in stored} == {"ua", "ub"}

        again = await reconciler.run(full=True, dry_run=True)
        assert set(movement_findings(again.findings)) == {paid, kept}
        assert kinds(again) == {"wallet_movement": 2}

    await with_pipeline(rsettings, write_engine, read_engine, reconcile)


@pytest.mark.breaks_the_ledger
async def test_an_incremental_run_judges_the_movements_of_its_scope_only(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=12)
    fund(write_engine, "ua", "ub")
    before_scope = pay(write_engine, "ua", 400)
    lose_newest_movement(write_engine, "ua")
    # The watermark of an earlier run, past the safety margin after the payment above.
    await asyncio.sleep(rsettings.reconcile_safety_margin_seconds + 0.5)
    watermark = str(bound_at(utcnow()))
    in_scope = pay(write_engine, "ub", 500)
    lose_newest_movement(write_engine, "ub")
    await asyncio.to_thread(make_traffic, write_engine, payments_count=5, seed=13)

    async def reconcile() -> None:
        records.acquire_lock(read_engine, "an-earlier-run", 60)
        records.release_lock(read_engine, "an-earlier-run", watermark=watermark)
        incremental = await reconciler.run()
        assert incremental.scope.startswith("events recorded after"), incremental.scope
        assert kinds(incremental) == {"wallet_movement": 1}, incremental.findings
        assert set(movement_findings(incremental.findings)) == {in_scope}
        assert incremental.exit_code == 1

        full = await reconciler.run(full=True)
        assert kinds(full) == {"wallet_movement": 2}, full.findings
        assert set(movement_findings(full.findings)) == {before_scope, in_scope}
        assert full.exit_code == 1

    await with_pipeline(rsettings, write_engine, read_engine, reconcile)


async def test_every_movement_in_place_is_no_finding(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    """Balance payments, refunds of them (two of one payment), card payments: nothing owed is
    missing, in a full audit and in an incremental run."""
    await asyncio.to_thread(
        make_traffic, write_engine, payments_count=30, refund_share=0.5, second_refund_share=0.5
    )

    async def reconcile() -> None:
        full = await reconciler.run(full=True)
        assert full.findings == []
        assert full.outcome == "consistent"
        incremental = await reconciler.run()
        assert incremental.findings == []

    await with_pipeline(rsettings, write_engine, read_engine, reconcile)
