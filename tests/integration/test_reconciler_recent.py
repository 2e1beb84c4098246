"""Payments of a run's last moments (recorded after its cut: the safety margin) count in the
totals only once their read row shows them applied. A payment found missing there cannot show
it: the totals that count it must be reported unverified until it is repaired, never wrong
while they are right."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.engine import Engine

from kessai.schema.read import payments
from kessai.settings import Settings
from projector.service import Projector
from reconciler.service import Reconciler
from tests.integration.test_reconciler import kinds, project
from tests.pipeline import (
    make_traffic,
    read_payments,
    read_side_matches,
    read_totals,
    running,
)


@pytest.fixture
def recent(pipeline_settings: Settings) -> Settings:
    """Every event of the test falls after the run's cut: an hour of safety margin."""
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 3600.0,
        }
    )


async def test_a_dry_run_never_reports_right_totals_wrong_for_a_recent_missing_payment(
    recent: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=12, seed=31)
    await project(recent, write_engine, read_engine)
    with read_engine.begin() as conn:
        conn.execute(payments.delete().where(payments.c.payment_id == traffic.payment_ids[0]))
    before = (read_payments(read_engine), read_totals(read_engine))
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=recent)

    result = await reconciler.run(dry_run=True)

    found = kinds(result)
    assert found.pop("missing") == 1
    # The totals counting that payment are right; the run cannot tell while its row is
    # missing, and says so rather than calling them wrong.
    assert set(found) <= {"totals_unverified"}, result.findings
    assert (read_payments(read_engine), read_totals(read_engine)) == before


async def test_a_real_run_repairs_the_recent_payment_and_leaves_its_totals_as_they_were(
    recent: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=12, seed=32)
    await project(recent, write_engine, read_engine)
    totals = read_totals(read_engine)
    with read_engine.begin() as conn:
        conn.execute(payments.delete().where(payments.c.payment_id == traffic.payment_ids[0]))
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=recent)

    async with running(Projector(engine=read_engine, settings=recent)):
        result = await reconciler.run()

    assert kinds(result) == {"missing": 1}
    assert all(f.repaired for f in result.findings)
    assert read_totals(read_engine) == totals
    assert read_side_matches(write_engine, read_engine)
