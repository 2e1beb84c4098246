"""How far each check of the reconciler is verified ("verified up to", per check): a completed,
non-dry run advances a check to its upper bound when the check ends with no unrepaired finding
and the run continues what the check verified before; a check with drift keeps its instant
while the others advance; a dry run advances nothing; an incremental run never advances the
totals, nor a check its scope does not reach back to. Shown by the run, stored in the state row
and the run's row, printed by ``kessai reconcile`` (and ``--history``) and served by the admin
API.

Against the real pipeline (write store, relay, broker, projector, read database), both
backends.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from kessai.auth import ADMIN
from kessai.ids import bound_at, timestamp_ms
from kessai.schema.read import RECONCILER_CHECKS, reconciliation_runs, wallets
from kessai.settings import Settings
from kessai_cli.main import app
from migrations import alembic_config, upgrade
from query_service.app import create_app as create_query_app
from query_service.schemas import ReconciliationRunsOut
from reconciler import records
from reconciler.records import CheckResult
from reconciler.service import Reconciler, RunResult
from tests.helpers import api_key, bearer
from tests.integration import test_reconciler
from tests.integration.test_reconciler import kinds, project
from tests.pipeline import make_traffic

rsettings = test_reconciler.rsettings
reconciler = test_reconciler.reconciler
cli_env = test_reconciler.cli_env

OTHERS = tuple(c for c in RECONCILER_CHECKS if c != "wallet_balance")


def upper_of(result: RunResult) -> datetime:
    """The run's upper bound (its look-around) as an instant."""
    assert result.watermark_to is not None
    return datetime.fromtimestamp(timestamp_ms(uuid.UUID(result.watermark_to)) / 1000, UTC)


def verified_after(result: RunResult) -> dict[str, datetime | None]:
    assert result.checks is not None
    return {name: c.verified_up_to for name, c in result.checks.items()}


def stored_checks(read_engine: Engine, run_id: int | None) -> dict[str, CheckResult] | None:
    with read_engine.connect() as conn:
        stored = conn.execute(
            sa.select(reconciliation_runs.c.checks).where(reconciliation_runs.c.run_id == run_id)
        ).scalar_one()
    return records.checks_of(stored)


def break_a_wallet(read_engine: Engine) -> None:
    """A wallet's balance on the read side off by 500 (behind the projector's back)."""
    with read_engine.begin() as conn:
        conn.execute(
            wallets.update()
            .where(wallets.c.user_id == "u1")
            .values(balance=wallets.c.balance + 500)
        )


async def test_a_full_audit_verifies_every_check_and_a_dry_run_none(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=31)
    await project(rsettings, write_engine, read_engine)
    assert records.verified_up_to(read_engine) == dict.fromkeys(RECONCILER_CHECKS)

    dry = await reconciler.run(full=True, dry_run=True)
    assert dry.outcome == "consistent"
    assert verified_after(dry) == dict.fromkeys(RECONCILER_CHECKS)  # a dry run advances nothing
    assert records.verified_up_to(read_engine) == dict.fromkeys(RECONCILER_CHECKS)

    full = await reconciler.run(full=True)
    assert full.outcome == "consistent"
    assert full.checks == dict.fromkeys(RECONCILER_CHECKS, CheckResult(0, 0, upper_of(full)))
    assert records.verified_up_to(read_engine) == dict.fromkeys(RECONCILER_CHECKS, upper_of(full))
    assert stored_checks(read_engine, full.run_id) == full.checks
    assert stored_checks(read_engine, dry.run_id) == dry.checks


async def test_drift_in_one_check_leaves_it_behind_while_the_others_advance(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=32)
    await project(rsettings, write_engine, read_engine)
    first = await reconciler.run(full=True)
    assert first.outcome == "consistent"
    u1 = upper_of(first)

    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=33)
    await project(rsettings, write_engine, read_engine)  # then relay and projector stop
    break_a_wallet(read_engine)
    # With no projector to apply its re-published movements, the wallet cannot be repaired.
    stuck = Reconciler(
        write_engine=write_engine,
        read_engine=read_engine,
        settings=rsettings.model_copy(update={"reconcile_verify_timeout_seconds": 1.0}),
    )
    drift = await stuck.run(full=True)
    assert kinds(drift) == {"wallet_balance": 1}, drift.findings
    assert (drift.outcome, drift.exit_code) == ("drift", 1)
    u2 = upper_of(drift)
    assert u2 > u1
    assert drift.checks is not None
    assert drift.checks["wallet_balance"] == CheckResult(1, 1, u1)
    assert {c: drift.checks[c] for c in OTHERS} == dict.fromkeys(OTHERS, CheckResult(0, 0, u2))
    assert records.verified_up_to(read_engine) == {
        **dict.fromkeys(OTHERS, u2),
        "wallet_balance": u1,
    }
    assert stored_checks(read_engine, drift.run_id) == drift.checks

    # The projector back: an incremental run (from the watermark the first run left) repairs
    # the wallet and verifies it again; the totals wait for a full audit.
    await project(rsettings, write_engine, read_engine)
    again = await reconciler.run()
    assert again.outcome == "consistent", again.findings
    assert again.scope.startswith("events recorded after")
    u3 = upper_of(again)
    assert verified_after(again) == {**dict.fromkeys(RECONCILER_CHECKS, u3), "totals": u2}
    assert records.verified_up_to(read_engine) == verified_after(again)


async def test_an_incremental_run_does_not_advance_a_check_its_scope_does_not_reach_back_to(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=34)
    await project(rsettings, write_engine, read_engine)
    now = datetime.now(UTC).replace(microsecond=0)
    long_ago, recently = now - timedelta(hours=1), now - timedelta(seconds=5)
    # As earlier runs left it: the watermark recent; wallet_chain verified only up to an hour
    # ago, trial_balance never (as after the upgrade that brought "verified up to").
    before = {
        **dict.fromkeys(RECONCILER_CHECKS, recently),
        "wallet_chain": long_ago,
        "trial_balance": None,
    }
    records.acquire_lock(read_engine, "earlier-runs", 60)
    records.release_lock(
        read_engine, "earlier-runs", watermark=str(bound_at(recently)), verified=before
    )

    result = await reconciler.run()
    assert result.outcome == "consistent", result.findings
    assert result.scope.startswith("events recorded after")
    advanced = upper_of(result)
    assert verified_after(result) == {
        **dict.fromkeys(RECONCILER_CHECKS, advanced),
        "wallet_chain": long_ago,  # the hour before the scope was not checked
        "trial_balance": None,  # nor anything before it
        "totals": recently,  # only a full audit advances the totals
    }
    assert records.verified_up_to(read_engine) == verified_after(result)

    full = await reconciler.run(full=True)
    assert verified_after(full) == dict.fromkeys(RECONCILER_CHECKS, upper_of(full))


def test_the_cli_and_the_admin_api_show_how_far_each_check_is_verified(
    cli_env: None, rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    make_traffic(write_engine, payments_count=5, seed=35)
    asyncio.run(project(rsettings, write_engine, read_engine))
    runner = CliRunner()
    audit = runner.invoke(app, ["reconcile", "--full"])
    assert audit.exit_code == 0, audit.output
    audited = records.verified_up_to(read_engine)["payments"]
    assert audited is not None
    when = audited.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    assert "verified up to (UTC)" in audit.output
    for check in RECONCILER_CHECKS:
        assert rows(audit.output, check) == [[check, "0", "0", when]]

    break_a_wallet(read_engine)  # no projector: the repair cannot finish
    drift = runner.invoke(app, ["reconcile", "--full"])
    assert drift.exit_code == 1, drift.output
    finding, check = rows(drift.output, "wallet_balance")  # the findings' table, the checks'
    assert finding[1:3] == ["-", "no"]
    assert check == ["wallet_balance", "1", "1", when]  # one finding, unrepaired: where it was
    (advanced,) = rows(drift.output, "payments")
    assert advanced[:3] == ["payments", "0", "0"]
    assert advanced[3] > when  # the other checks advanced

    history = runner.invoke(app, ["reconcile", "--history"])
    assert history.exit_code == 0, history.output
    assert "drift in" in history.output
    assert rows(history.output, "wallet_balance") == [["wallet_balance", when]]
    assert rows(history.output, "payments") == [["payments", advanced[3]]]

    asyncio.run(_admin_api_shows_them(rsettings, read_engine))


def rows(output: str, first: str) -> list[list[str]]:
    """The cells of the rows printed (rich tables) whose first cell is ``first``."""
    found = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == first:
            found.append(cells)
    return found


async def _admin_api_shows_them(rsettings: Settings, read_engine: Engine) -> None:
    runs = records.recent_runs(read_engine)
    verified = records.verified_up_to(read_engine)
    app_ = create_query_app(rsettings)
    async with (
        app_.router.lifespan_context(app_),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app_),
            base_url="http://q",
            headers=bearer(api_key(rsettings, ADMIN)),
        ) as q,
    ):
        answer = await q.get("/v1/admin/reconciliation/runs")
    assert answer.status_code == 200, answer.text
    page = answer.json()
    ReconciliationRunsOut.model_validate(page)  # as documented
    assert page["verified_up_to"] == {c: _api_time(m) for c, m in verified.items()}
    newest, older = page["items"][0], page["items"][1]
    assert (newest["run_id"], older["run_id"]) == (runs[0].run_id, runs[1].run_id)
    assert newest["checks"] == {
        c: {
            "findings": int(c == "wallet_balance"),
            "unrepaired": int(c == "wallet_balance"),
            "verified_up_to": _api_time(verified[c]),
        }
        for c in RECONCILER_CHECKS
    }
    assert older["checks"]["wallet_balance"] == {
        "findings": 0,
        "unrepaired": 0,
        "verified_up_to": _api_time(verified["wallet_balance"]),
    }


def _api_time(moment: datetime | None) -> str | None:
    """An instant as the API writes it."""
    return None if moment is None else moment.isoformat(timespec="microseconds")


def test_the_migration_adds_and_removes_the_columns(read_db_url: str) -> None:
    def columns() -> tuple[set[str], set[str]]:
        engine = sa.create_engine(read_db_url)
        try:
            inspector = sa.inspect(engine)
            return (
                {c["name"] for c in inspector.get_columns("reconciler_state")},
                {c["name"] for c in inspector.get_columns("reconciliation_runs")},
            )
        finally:
            engine.dispose()

    state, runs = columns()
    assert ("verified_up_to" in state, "checks" in runs) == (True, True)
    command.downgrade(alembic_config("read", read_db_url), "r0005_wallets")
    state, runs = columns()
    assert ("verified_up_to" in state, "checks" in runs) == (False, False)
    upgrade("read", read_db_url)
    state, runs = columns()
    assert ("verified_up_to" in state, "checks" in runs) == (True, True)
