"""The reconciler checks the ledger as a whole: each wallet's chain of balances in the write
store, and the balances the read side shows (repaired by re-publishing the wallet's movements).

Against the real pipeline: write store, relay, broker, projector, read database. Each test ends
with every wallet on the read side equal to the fold of its movements in the write store,
computed here independently (``wallets_match``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.clock import utcnow
from kessai.events import wallet_stream_id
from kessai.ids import new_id
from kessai.schema.read import dead_letters, wallet_movements, wallets
from kessai.schema.write import wallet_events
from kessai.settings import Settings
from projector.service import Projector
from reconciler.service import Reconciler, RunResult
from tests.pipeline import make_traffic, read_side_matches, running, wait_until


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
            "reconcile_chunk_size": 7,  # several chunks even with few wallets
        }
    )


@pytest.fixture
def reconciler(rsettings: Settings, write_engine: Engine, read_engine: Engine) -> Reconciler:
    return Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)


def write_balances(engine: Engine) -> dict[str, tuple[int, int]]:
    """(version, balance) of each wallet: the sum of its movements, folded here."""
    folded: dict[str, tuple[int, int]] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                wallet_events.c.user_id, wallet_events.c.version, wallet_events.c.amount
            ).order_by(wallet_events.c.user_id, wallet_events.c.version)
        )
        for user_id, version, amount in rows:
            folded[user_id] = (version, folded.get(user_id, (0, 0))[1] + amount)
    return folded


def read_balances(engine: Engine) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(wallets.c.user_id, wallets.c.version, wallets.c.balance))
        return {user_id: (version, balance) for user_id, version, balance in rows}


def movements_shown(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(wallet_movements)).scalar_one()
        )


def wallets_match(write_engine: Engine, read_engine: Engine) -> bool:
    return write_balances(write_engine) == read_balances(read_engine)


def everything_matches(write_engine: Engine, read_engine: Engine) -> Callable[[], bool]:
    return lambda: (
        read_side_matches(write_engine, read_engine) and wallets_match(write_engine, read_engine)
    )


def kinds(result: RunResult) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in result.findings:
        found[f.kind] = found.get(f.kind, 0) + 1
    return found


async def with_pipeline(
    settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    body: Callable[[], Awaitable[None]],
) -> None:
    """Relay and projector running while ``body`` runs, once the read side caught up."""
    relay = Relay(engine=write_engine, settings=settings)
    projector = Projector(engine=read_engine, settings=settings)
    async with running(relay, projector) as tasks:
        await wait_until(everything_matches(write_engine, read_engine), tasks=tasks)
        await body()


async def test_wallets_projected_right_are_consistent(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=40)

    async def check() -> None:
        result = await reconciler.run()
        assert result.findings == []
        assert result.outcome == "consistent"

    await with_pipeline(rsettings, write_engine, read_engine, check)
    assert len(write_balances(write_engine)) == 50  # every payer was funded


async def test_wrong_and_missing_balances_on_the_read_side_are_found_and_repaired(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=40, seed=5)
    truth = write_balances(write_engine)
    shown_before = 0

    async def damage_then_reconcile() -> None:
        nonlocal shown_before
        shown_before = movements_shown(read_engine)
        with read_engine.begin() as conn:
            conn.execute(
                wallets.update()
                .where(wallets.c.user_id == "u1")
                .values(balance=wallets.c.balance + 500)
            )
            conn.execute(wallets.delete().where(wallets.c.user_id == "u2"))
            conn.execute(wallet_movements.delete().where(wallet_movements.c.user_id == "u2"))
            conn.execute(
                wallet_movements.delete().where(
                    wallet_movements.c.user_id == "u3", wallet_movements.c.version == 1
                )
            )
        dry = await reconciler.run(dry_run=True)
        assert kinds(dry) == {"wallet_balance": 3}, dry.findings
        by_user = {str((f.details or {})["user_id"]): f.details or {} for f in dry.findings}
        assert by_user["u1"] == {
            "user_id": "u1",
            "write_balance": truth["u1"][1],
            "read_balance": truth["u1"][1] + 500,
            "write_version": truth["u1"][0],
            "read_version": truth["u1"][0],
            "currency": "JPY",
            "statement_lines": truth["u1"][0],
        }
        assert by_user["u2"]["read_balance"] is None
        assert by_user["u3"]["statement_lines"] == truth["u3"][0] - 1
        assert not any(f.repaired for f in dry.findings)
        assert (
            read_balances(read_engine)["u1"][1] == truth["u1"][1] + 500
        )  # a dry run repairs nothing

        result = await reconciler.run()
        assert kinds(result) == {"wallet_balance": 3}
        assert all(f.repaired for f in result.findings)
        assert result.outcome == "consistent"
        assert read_balances(read_engine) == truth
        # The statement that lost a line (u3's first) has it back; u2's is whole again.
        assert movements_shown(read_engine) == shown_before

    await with_pipeline(rsettings, write_engine, read_engine, damage_then_reconcile)


async def test_a_dead_lettered_wallet_movement_is_repaired_from_the_write_store(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    """A wallet's movement mangled on its way (a dead letter) holds its later movements back;
    the run re-publishes the wallet from the write store and the valid copy supersedes it."""
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=3)

    async def reconcile() -> None:
        result = await reconciler.run()
        assert result.outcome == "consistent", result.findings
        assert kinds(result) == {"dead_letter": 1, "wallet_balance": 1}
        assert all(f.repaired for f in result.findings)
        with read_engine.connect() as conn:
            open_letters = conn.execute(
                sa.select(sa.func.count())
                .select_from(dead_letters)
                .where(dead_letters.c.status == "open")
            ).scalar_one()
        assert open_letters == 0
        assert wallets_match(write_engine, read_engine)

    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(everything_matches(write_engine, read_engine), tasks=tasks)
        # u7's next movement reaches the projector as a dead letter (a mangled copy) and the
        # read side says nothing of it: what the run must find and repair.
        with write_engine.connect() as conn:
            version, body = conn.execute(
                sa.select(wallet_events.c.version, wallet_events.c.body)
                .where(wallet_events.c.user_id == "u7")
                .order_by(wallet_events.c.version.desc())
                .limit(1)
            ).one()
        event = orjson.loads(body)
        with read_engine.begin() as conn:
            conn.execute(
                dead_letters.insert().values(
                    payment_id=wallet_stream_id("u7"),
                    version=version,
                    topic=rsettings.topic,
                    kafka_partition=0,
                    kafka_offset=10**9,
                    raw_key=None,
                    raw_value=orjson.dumps({**event, "payload": "mangled"}),
                    headers="{}",
                    reason="undecodable event: payload: mangled",
                    status="open",
                    created_at=utcnow(),
                )
            )
            conn.execute(
                wallet_movements.delete().where(
                    wallet_movements.c.user_id == "u7", wallet_movements.c.version == version
                )
            )
            conn.execute(
                wallets.update().where(wallets.c.user_id == "u7").values(version=version - 1)
            )
        await reconcile()


@pytest.mark.breaks_the_ledger
async def test_a_wallet_chain_that_does_not_add_up_is_drift_the_run_cannot_repair(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=9)
    (version, balance) = write_balances(write_engine)["u4"]
    # A movement that claims a balance its amount does not leave (no write path does this:
    # the store takes it, being append-only, not a judge of sums).
    with write_engine.begin() as conn:
        conn.execute(
            wallet_events.insert().values(
                user_id="u4",
                version=version + 1,
                event_id=new_id(),
                event_type="TopUpReceived",
                schema_version=2,
                currency="JPY",
                amount=100,
                balance_after=balance + 1_000,
                recorded_at=utcnow(),
                body=orjson.dumps(
                    {
                        "event_id": str(new_id()),
                        "schema_version": 2,
                        "user_id": "u4",
                        "version": version + 1,
                        "occurred_at": utcnow().isoformat(),
                        "recorded_at": utcnow().isoformat(),
                        "postings": [
                            {"account": "world:topup:bank", "amount": -100},
                            {"account": "user:u4", "amount": 100},
                        ],
                        "event_type": "TopUpReceived",
                        "payload": {
                            "top_up_id": str(new_id()),
                            "amount": 100,
                            "currency": "JPY",
                            "source": "bank",
                            "balance_after": balance + 1_000,
                        },
                    }
                ).decode(),
            )
        )
    result = await reconciler.run(full=True, dry_run=True)
    chain = [f for f in result.findings if f.kind == "wallet_chain"]
    assert [f.details for f in chain] == [
        {
            "user_id": "u4",
            "version": version + 1,
            "balance_before": balance,
            "amount": 100,
            "balance_after": balance + 1_000,
            "problem": f"wallet u4: {balance} +100 is not {balance + 1_000}",
        }
    ]
    assert result.outcome == "drift"
