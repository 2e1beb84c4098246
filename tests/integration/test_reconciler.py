"""The reconciler against the real pipeline: write store, relay, broker, projector, read DB.

Each repair test breaks the read side in one way, runs a reconciliation and ends with the read
side compared with the fold of the write store (``assert_read_side_matches``).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from command_service import handlers
from command_service.relay import Relay
from command_service.routes.payments import capture_command
from command_service.routes.refunds import refund_command
from command_service.schemas import CreatePayment, CreateRefund
from kessai.auth import ADMIN
from kessai.broker import free_port
from kessai.clock import parse_interval, utcnow
from kessai.ids import new_id
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    parked_events,
    payments,
    reconciler_state,
    reconciliation_findings,
    reconciliation_runs,
    refunds,
)
from kessai.schema.write import outbox
from kessai.settings import Settings
from kessai_cli.main import app
from projector.service import Projector
from query_service.app import create_app as create_query_app
from reconciler import records
from reconciler.records import Finding
from reconciler.service import Reconciler, RunResult
from tests.helpers import api_key, bearer
from tests.integration.read_model import captured, refunded
from tests.integration.read_model import project as apply_directly
from tests.pipeline import (
    assert_read_side_matches,
    make_traffic,
    produce,
    read_payments,
    read_side_matches,
    read_totals,
    running,
    wait_until,
    wallets_match,
    write_store_events,
)


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
            "reconcile_chunk_size": 7,  # several chunks even with little traffic
        }
    )


@pytest.fixture
def reconciler(rsettings: Settings, write_engine: Engine, read_engine: Engine) -> Reconciler:
    return Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)


def count(engine: Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def kinds(result: RunResult) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in result.findings:
        found[f.kind] = found.get(f.kind, 0) + 1
    return found


def all_projected(write_engine: Engine, read_engine: Engine) -> bool:
    """The payments, the totals and the wallets (which the reconciler checks too) all equal
    the fold of the write store."""
    return read_side_matches(write_engine, read_engine) and wallets_match(write_engine, read_engine)


async def project(settings: Settings, write_engine: Engine, read_engine: Engine) -> None:
    """Relay and project everything in the write store, then stop both."""
    relay = Relay(engine=write_engine, settings=settings)
    projector = Projector(engine=read_engine, settings=settings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)


def stored_watermark(read_engine: Engine) -> str | None:
    with read_engine.connect() as conn:
        value: str | None = conn.execute(sa.select(reconciler_state.c.watermark)).scalar()
        return value


async def test_a_clean_pipeline_is_consistent_and_the_run_is_recorded(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=40)
    await project(rsettings, write_engine, read_engine)
    result = await reconciler.run()
    assert result.findings == []
    assert (result.outcome, result.exit_code, result.payments_checked) == ("consistent", 0, 40)
    runs = records.recent_runs(read_engine)
    assert [(r.run_id, r.outcome, r.payments_checked, r.findings_count) for r in runs] == [
        (result.run_id, "consistent", 40, 0)
    ]
    assert runs[0].finished_at is not None
    assert stored_watermark(read_engine) == result.watermark_to


async def test_deleted_and_altered_read_rows_are_found_and_repaired(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=40, seed=11)
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        with read_engine.connect() as conn:
            refunded = sorted(set(conn.execute(sa.select(refunds.c.payment_id)).scalars()))
        plain = [pid for pid in traffic.payment_ids if pid not in refunded]
        # One payment row loses its refund rows with it; another leaves them behind.
        deleted, altered = [*refunded[:2], plain[0]], [refunded[2], *plain[1:3]]
        with read_engine.begin() as conn:
            conn.execute(refunds.delete().where(refunds.c.payment_id == refunded[0]))
            conn.execute(payments.delete().where(payments.c.payment_id.in_(deleted)))
            conn.execute(
                payments.update()
                .where(payments.c.payment_id.in_(altered))
                .values(captured_amount=payments.c.captured_amount + 1)
            )
        result = await reconciler.run()
    found = kinds(result)
    assert (found["missing"], found["mismatch"]) == (3, 3)
    assert {f.payment_id for f in result.findings if f.kind == "missing"} == set(deleted)
    assert {f.payment_id for f in result.findings if f.kind == "mismatch"} == set(altered)
    # The totals were right: what re-applying the reset payments adds back was taken out
    # first, so they never counted anything twice, and nothing had to be rewritten.
    assert set(found) == {"missing", "mismatch"}
    assert all(f.repaired for f in result.findings)
    assert (result.outcome, result.exit_code) == ("consistent", 0)
    assert_read_side_matches(write_engine, read_engine)
    stored = findings_of(read_engine, result.run_id or 0)
    assert len(stored) == len(result.findings)
    assert all(f.repaired for f in stored)


async def test_events_lost_before_publication_are_republished(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=30, seed=12)
    lost = traffic.payment_ids[-5:]
    with write_engine.begin() as conn:
        conn.execute(outbox.delete().where(outbox.c.payment_id.in_(lost)))
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: count(read_engine, payments) == 25, tasks=tasks)
        await wait_until(lambda: count(write_engine, outbox) == 0, tasks=tasks)
        result = await reconciler.run()
    # The totals never counted the lost payments: found wrong and rewritten from the events.
    found = kinds(result)
    assert found.pop("missing") == 5
    assert set(found) <= {"daily_totals", "hourly_totals"}
    assert {f.payment_id for f in result.findings if f.kind == "missing"} == set(lost)
    assert all(f.repaired for f in result.findings)
    assert all(f.merchant_id for f in result.findings)
    assert result.exit_code == 0
    assert_read_side_matches(write_engine, read_engine)


def _policy(key: str) -> handlers.WritePolicy:
    return handlers.WritePolicy(
        client_id="test",
        idempotency_key=key,
        retention=timedelta(hours=1),
        shards=8,
        max_attempts=30,
    )


async def test_a_version_never_delivered_is_a_parked_gap_that_gets_filled(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    outcome = handlers.record_alone(
        write_engine,
        capture_command(
            policy=_policy("gap-p"),
            command=CreatePayment(merchant_id="m1", user_id="u1", amount=1000, method="card"),
            device_id=None,
        ),
    )
    pid = uuid.UUID(orjson.loads(outcome.body)["payment_id"])
    for i in range(2):
        handlers.record_alone(
            write_engine,
            refund_command(
                policy=_policy(f"gap-r{i}"),
                payment_id=pid,
                command=CreateRefund(amount=100),
            ),
        )
    with write_engine.begin() as conn:
        conn.execute(outbox.delete())  # the relay never publishes them
    v1, _v2, v3 = write_store_events(write_engine)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(projector) as tasks:
        await produce(rsettings.resolved_kafka_bootstrap(), rsettings.topic, [v1, v3])
        await wait_until(lambda: count(read_engine, parked_events) == 1, tasks=tasks)
        await wait_until(lambda: count(read_engine, payments) == 1, tasks=tasks)
        result = await reconciler.run()
    assert kinds(result) == {"mismatch": 1, "parked": 1}
    parked = next(f for f in result.findings if f.kind == "parked")
    assert (parked.payment_id, (parked.details or {})["version"]) == (pid, 3)
    mismatch = next(f for f in result.findings if f.kind == "mismatch")
    assert (mismatch.details or {})["reset"] is False  # only behind: re-publishing fills it
    assert all(f.repaired for f in result.findings)
    assert count(read_engine, parked_events) == 0
    assert_read_side_matches(write_engine, read_engine)


async def test_read_rows_with_no_payment_behind_them_are_found_and_removed(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=18)
    await project(rsettings, write_engine, read_engine)
    # A payment and its refund the read side shows, counted in m0's totals, that the write store
    # never took (a bug, or a hand-made row); and refund rows of a payment with no row at all.
    now = utcnow()
    invented = captured(at=now, merchant_id="m0", amount=5_000)
    apply_directly(read_engine, [invented, refunded(invented, at=now, amount=700)])
    stray = new_id()
    with read_engine.begin() as conn:
        conn.execute(
            refunds.insert().values(
                payment_id=stray, version=2, refund_id=new_id(), merchant_id="m1", amount=300,
                currency="JPY", reason=None, created_at=now,
            )
        )  # fmt: skip
    before = (read_payments(read_engine), read_totals(read_engine))

    dry = await reconciler.run(dry_run=True)
    found = kinds(dry)
    assert found.pop("orphan") == 2
    assert set(found) == {"daily_totals", "hourly_totals"}  # counting money never taken
    assert {f.payment_id for f in dry.findings if f.payment_id} == {invented.payment_id, stray}
    assert not any(f.repaired for f in dry.findings)
    assert dry.exit_code == 1
    assert (read_payments(read_engine), read_totals(read_engine)) == before

    result = await reconciler.run()
    found = kinds(result)
    assert found.pop("orphan") == 2
    assert set(found) <= {"daily_totals", "hourly_totals"}
    assert found  # m0's totals counted the invented payment until they were rewritten
    orphan = next(f for f in result.findings if f.payment_id == invented.payment_id)
    assert (orphan.merchant_id, (orphan.details or {})["captured_amount"]) == ("m0", 5_000)
    assert all(f.repaired for f in result.findings)
    assert result.exit_code == 0
    assert count(read_engine, refunds, refunds.c.payment_id.in_([invented.payment_id, stray])) == 0
    assert_read_side_matches(write_engine, read_engine)


async def test_totals_that_disagree_with_their_rows_are_rewritten(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=30, seed=13)
    await project(rsettings, write_engine, read_engine)
    with read_engine.begin() as conn:
        conn.execute(
            merchant_daily_totals.update()
            .where(merchant_daily_totals.c.merchant_id == "m0")
            .values(payments_amount=merchant_daily_totals.c.payments_amount + 7)
        )
        conn.execute(
            merchant_hourly_totals.update()
            .where(merchant_hourly_totals.c.merchant_id == "m1")
            .values(refunds_count=merchant_hourly_totals.c.refunds_count + 1)
        )
        # A bucket with no rows behind it at all.
        conn.execute(
            merchant_daily_totals.insert().values(
                merchant_id="m9",
                day=date(2026, 1, 1),
                currency="JPY",
                payments_count=1,
                payments_amount=5,
                refunds_count=0,
                refunds_amount=0,
            )
        )
    result = await reconciler.run(full=True)
    found = kinds(result)
    assert found["daily_totals"] >= 2
    assert found["hourly_totals"] >= 1
    assert set(found) == {"daily_totals", "hourly_totals"}
    assert all(f.repaired for f in result.findings)
    assert result.exit_code == 0
    assert_read_side_matches(write_engine, read_engine)


async def test_a_dry_run_reports_and_changes_nothing(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=14)
    await project(rsettings, write_engine, read_engine)
    with read_engine.begin() as conn:
        conn.execute(payments.delete().where(payments.c.payment_id == traffic.payment_ids[0]))
        conn.execute(
            payments.update()
            .where(payments.c.payment_id == traffic.payment_ids[1])
            .values(refunded_amount=1, status="partially_refunded", version=7)
        )
    before = (read_payments(read_engine), read_totals(read_engine))
    result = await reconciler.run(dry_run=True)
    assert {"missing", "mismatch"} <= set(kinds(result))
    assert not any(f.repaired for f in result.findings)
    assert (result.outcome, result.exit_code, result.dry_run) == ("drift", 1, True)
    assert (read_payments(read_engine), read_totals(read_engine)) == before
    assert stored_watermark(read_engine) is None
    assert count(read_engine, reconciliation_findings) == len(result.findings)


def settled(write_engine: Engine, read_engine: Engine) -> bool:
    return count(write_engine, outbox) == 0 and all_projected(write_engine, read_engine)


async def test_an_incremental_run_checks_only_what_is_new(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=15)
        # Projected, and published rows deleted: payments still in the outbox are skipped.
        await wait_until(lambda: settled(write_engine, read_engine), tasks=tasks)
        # Older than the first run's start minus the safety margin (0.5 s), with room to spare.
        await asyncio.sleep(1.5)
        first = await reconciler.run()
        assert (first.exit_code, first.payments_checked) == (0, 20)
        await asyncio.to_thread(make_traffic, write_engine, payments_count=7, seed=16)
        await wait_until(lambda: settled(write_engine, read_engine), tasks=tasks)
        second = await reconciler.run()
    assert (second.exit_code, second.payments_checked) == (0, 7)
    assert second.watermark_from == first.watermark_to
    full = await reconciler.run(full=True)
    assert (full.exit_code, full.payments_checked) == (0, 27)


async def test_the_watermark_stops_before_events_still_in_the_outbox(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=5, seed=17)
    with write_engine.connect() as conn:
        oldest = conn.execute(sa.select(sa.func.min(outbox.c.event_id))).scalar_one()
    result = await reconciler.run()
    # Every payment is still in flight: nothing compared, nothing wrong, no advance past it.
    assert (result.exit_code, result.payments_checked) == (0, 0)
    assert result.watermark_to is not None
    assert isinstance(oldest, uuid.UUID)
    assert uuid.UUID(result.watermark_to) <= oldest


async def test_one_run_at_a_time(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    records.acquire_lock(read_engine, "another-instance", 60)
    blocked = await reconciler.run()
    # Refused, and not a failure: skipped (exit code 2), and not recorded as a run.
    assert (blocked.outcome, blocked.exit_code, blocked.run_id) == ("skipped", 2, None)
    assert "another-instance" in (blocked.error or "")
    records.release_lock(read_engine, "another-instance")
    # Two runs started together: one of them finds the lock taken.
    other = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)
    await asyncio.to_thread(make_traffic, write_engine, payments_count=3, seed=18)
    with write_engine.begin() as conn:
        conn.execute(outbox.delete())  # three payments missing on the read side: a slow run
    both = await asyncio.gather(reconciler.run(dry_run=True), other.run(dry_run=True))
    assert sorted(r.exit_code for r in both) == [1, 2]
    # A lapsed lock is taken over.
    records.acquire_lock(read_engine, "crashed-instance", 0.001)
    await asyncio.sleep(0.05)
    assert (await reconciler.run(dry_run=True)).exit_code == 1
    with read_engine.connect() as conn:
        outcomes = list(
            conn.execute(
                sa.select(reconciliation_runs.c.outcome).order_by(reconciliation_runs.c.run_id)
            ).scalars()
        )
    assert sorted(outcomes) == ["drift", "drift"]


async def test_an_unreachable_broker_is_a_failed_run_that_changes_nothing(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=5, seed=20)
    await project(rsettings, write_engine, read_engine)
    with read_engine.begin() as conn:
        conn.execute(
            payments.update()
            .where(payments.c.payment_id == traffic.payment_ids[0])
            .values(captured_amount=1)
        )
    before = read_payments(read_engine)
    settings = rsettings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "kafka_request_timeout_ms": 1000}
    )
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)
    result = await reconciler.run()
    assert (result.outcome, result.exit_code) == ("failed", 2)
    assert result.error
    # The wrong row was not removed: nothing is reset unless it can be re-published.
    assert read_payments(read_engine) == before
    [run] = records.recent_runs(read_engine)
    assert (run.outcome, run.error) == ("failed", result.error)
    assert stored_watermark(read_engine) is None
    # The lock was released: the next run can start (and finds the same drift).
    assert (await reconciler.run(dry_run=True)).exit_code == 1


async def test_on_a_schedule_until_stopped(reconciler: Reconciler) -> None:
    stop = asyncio.Event()
    seen: list[RunResult] = []

    def on_result(result: RunResult) -> None:
        seen.append(result)
        if len(seen) == 2:
            stop.set()

    code = await asyncio.wait_for(reconciler.run_every(0.05, stop, on_result=on_result), timeout=30)
    assert code == 0
    assert [r.outcome for r in seen] == ["consistent", "consistent"]
    assert [r.mode for r in seen] == ["incremental", "incremental"]  # no full audit asked for


def test_parse_interval() -> None:
    assert [parse_interval(t) for t in ("30s", "5m", "1h", "2")] == [30, 300, 3600, 2]
    for bad in ("", "0m", "5x", "m"):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_interval(bad)


@pytest.fixture
def cli_env(rsettings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "KESSAI_WRITE_DB_URL": rsettings.resolved_write_db_url(),
        "KESSAI_READ_DB_URL": rsettings.resolved_read_db_url(),
        "KESSAI_KAFKA_BOOTSTRAP": rsettings.resolved_kafka_bootstrap(),
        "KESSAI_TOPIC": rsettings.topic,
        "KESSAI_PROJECTOR_GROUP_ID": rsettings.projector_group_id,
        "KESSAI_TOPIC_PARTITIONS": "4",
        "KESSAI_RECONCILE_CONFIRM_SECONDS": "0",
        "KESSAI_RECONCILE_VERIFY_TIMEOUT_SECONDS": "2",
        "COLUMNS": "200",
    }.items():
        monkeypatch.setenv(name, value)


def test_cli_exit_codes_and_history(
    cli_env: None, write_engine: Engine, read_engine: Engine
) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["reconcile"])
    assert empty.exit_code == 0, empty.output
    assert "consistent" in empty.output

    make_traffic(write_engine, payments_count=4, refund_share=0.0, seed=19)
    with write_engine.begin() as conn:
        conn.execute(outbox.delete())  # lost before publication: missing on the read side
    drift = runner.invoke(app, ["reconcile", "--dry-run"])
    assert drift.exit_code == 1, drift.output
    assert "missing" in drift.output
    assert "drift" in drift.output

    records.acquire_lock(read_engine, "someone-else", 60)
    locked = runner.invoke(app, ["reconcile"])
    assert locked.exit_code == 2, locked.output
    assert "someone-else" in locked.output
    assert "skipped" in locked.output
    records.release_lock(read_engine, "someone-else")

    assert runner.invoke(app, ["reconcile", "--every", "soon"]).exit_code == 2
    assert runner.invoke(app, ["reconcile", "--every", "5m", "--full-every", "x"]).exit_code == 2

    history = runner.invoke(app, ["reconcile", "--history"])
    assert history.exit_code == 0, history.output
    assert "reconciliation runs" in history.output
    for outcome in ("consistent", "drift"):
        assert outcome in history.output
    assert "skipped" not in history.output  # a refused run is not recorded
    assert "everything" in history.output  # what each run verified
    assert "last completed full audit: never" in history.output


def test_cli_exits_2_when_the_read_database_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KESSAI_HOME", str(tmp_path))
    monkeypatch.setenv("KESSAI_READ_DB_URL", f"mysql+pymysql://root@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["reconcile"])
    assert result.exit_code == 2, result.output
    assert "cannot reach the read database" in result.output


async def test_runs_and_findings_are_readable_on_the_query_api(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=21)
    await project(rsettings, write_engine, read_engine)
    clean = await reconciler.run()
    with read_engine.begin() as conn:
        conn.execute(payments.delete().where(payments.c.payment_id == traffic.payment_ids[0]))
    found = await reconciler.run(full=True, dry_run=True)
    assert found.exit_code == 1

    app = create_query_app(rsettings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://q",
            headers=bearer(api_key(rsettings, ADMIN)),
        ) as q,
    ):
        first = await q.get("/v1/admin/reconciliation/runs", params={"limit": 1})
        assert first.status_code == 200, first.text
        page = first.json()
        (newest,) = page["items"]
        assert (newest["run_id"], newest["mode"], newest["dry_run"], newest["scope"]) == (
            found.run_id,
            "full",
            True,
            "everything",
        )
        assert (newest["outcome"], newest["findings_count"]) == ("drift", len(found.findings))
        missing = [f for f in newest["findings"] if f["kind"] == "missing"]
        assert [f["payment_id"] for f in missing] == [str(traffic.payment_ids[0])]
        assert not missing[0]["repaired"]

        older = await q.get(
            "/v1/admin/reconciliation/runs", params={"limit": 1, "before": page["next_before"]}
        )
        (oldest,) = older.json()["items"]
        assert (oldest["run_id"], oldest["outcome"], oldest["findings"]) == (
            clean.run_id,
            "consistent",
            [],
        )
        bad = await q.get("/v1/admin/reconciliation/runs", params={"limit": 0})
        assert bad.status_code == 422
        assert bad.json()["error"]["code"] == "validation_error"


def findings_of(engine: Engine, run_id: int) -> list[Finding]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(reconciliation_findings)
            .where(reconciliation_findings.c.run_id == run_id)
            .order_by(reconciliation_findings.c.seq)
        )
        return [
            Finding(
                kind=r.kind,
                payment_id=r.payment_id,
                merchant_id=r.merchant_id,
                details=orjson.loads(r.details),
                repaired=bool(r.repaired),
            )
            for r in rows
        ]
