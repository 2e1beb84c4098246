"""Campaigns and grants through the whole pipeline: write store -> relay -> broker -> projector ->
read database, and the reconciler over them (SQLite and MariaDB).

The write store gets campaign events (``campaign_events``) and grants (``RewardGranted`` on
users' wallet streams) through ``kessai.write_store.append_events``, as the command API's admin
routes and the rewards service append them, beside payments, refunds and top-ups. Each test
compares the read side with the write store, computed here independently: every campaign's row
is the fold of its events, its figures the sums of its grants, every wallet the fold of its
movements.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.campaigns import (
    AnyCampaignEvent,
    CampaignChange,
    CampaignStopped,
    campaign_stream_id,
    decide_change,
    fold_campaign,
    parse_campaign_event,
)
from kessai.clock import utcnow
from kessai.events import RewardGranted, RewardTakenBack, kafka_headers, parse_wallet_event
from kessai.ids import new_id
from kessai.schema.read import (
    campaign_minute_totals,
    campaign_totals,
    campaigns,
    dead_letters,
    parked_events,
    wallet_movements,
    wallets,
)
from kessai.schema.write import campaign_events, wallet_events
from kessai.settings import Settings
from kessai.write_store import append_events, load_wallets
from migrations import alembic_config, upgrade
from projector.service import Projector
from reconciler.service import Reconciler
from tests.integration.test_projector import count, metric
from tests.pipeline import (
    make_traffic,
    produce,
    read_side_matches,
    running,
    wait_until,
    wallets_match,
)
from tests.wallet_streams import book_grants, created, granted, record_parts, taken_back

Figures = tuple[dict[str, tuple[int, int]], dict[tuple[str, datetime], tuple[int, int]]]
"""Each campaign's (granted, grants), and per (campaign, minute)."""


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
        }
    )


def record_campaigns(engine: Engine, settings: Settings) -> list[AnyCampaignEvent]:
    """Two campaigns, one of them changed later: what the admin routes append."""
    now = utcnow()
    spring = created("spring", budget=500_000, starts_at=now - timedelta(days=1),
                     ends_at=now + timedelta(days=9), at=now - timedelta(days=2))  # fmt: skip
    welcome = created("welcome", kind="welcome_bonus", starts_at=now - timedelta(days=1),
                      ends_at=now + timedelta(days=9), at=now - timedelta(days=2))  # fmt: skip
    change = decide_change(
        fold_campaign([spring]), CampaignChange(budget=600_000), granted=0, now=now, actor="a-1"
    )
    recorded: list[AnyCampaignEvent] = [spring, welcome, change]
    with engine.begin() as conn:
        append_events(conn, recorded, shards=settings.outbox_shards)
    return recorded


def grant_to(
    engine: Engine,
    settings: Settings,
    users: Sequence[str],
    *,
    at: datetime,
    bonus: bool = True,
) -> None:
    """A grant to each user at the wallet's next version, with the rows the rewards service
    writes beside it: every other one a cashback of ``spring`` (on a payment the reconciler
    does not look up), the rest ``welcome``'s bonus (all of them cashbacks without ``bonus``:
    a user gets the bonus once)."""
    with engine.begin() as conn:
        held = load_wallets(conn, users)
        grants = []
        for i, user in enumerate(users):
            wallet, amount = held[user], 100 + 37 * i
            campaign = "spring" if i % 2 == 0 or not bonus else "welcome"
            grants.append(
                granted(
                    user,
                    amount,
                    balance_after=wallet.balance + amount,
                    version=wallet.version + 1,
                    at=at + timedelta(seconds=20 * i),
                    campaign_id=campaign,
                    payment_id=new_id() if campaign == "spring" else None,
                    currency=wallet.currency or "JPY",
                )
            )
        book_grants(conn, grants, shards=settings.outbox_shards)


def write_grants(engine: Engine) -> list[RewardGranted | RewardTakenBack]:
    """The grants and take-backs of the write store."""
    kinds = ("RewardGranted", "RewardTakenBack")
    with engine.connect() as conn:
        bodies = conn.execute(
            sa.select(wallet_events.c.body).where(wallet_events.c.event_type.in_(kinds))
        ).scalars()
        return [
            g
            for g in map(parse_wallet_event, bodies)
            if isinstance(g, RewardGranted | RewardTakenBack)
        ]


def expected_figures(grants: Sequence[RewardGranted | RewardTakenBack]) -> Figures:
    """Each grant adds its amount and one grant; each take-back takes its amount out."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    minutes: dict[tuple[str, datetime], list[int]] = defaultdict(lambda: [0, 0])
    for g in grants:
        minute = g.occurred_at.astimezone(UTC).replace(second=0, microsecond=0)
        grant = isinstance(g, RewardGranted)
        for sums in (totals[g.payload.campaign_id], minutes[g.payload.campaign_id, minute]):
            sums[0] += g.payload.amount if grant else -g.payload.amount
            sums[1] += grant
    return (
        {k: (v[0], v[1]) for k, v in totals.items()},
        {k: (v[0], v[1]) for k, v in minutes.items() if v != [0, 0]},
    )


def read_figures(engine: Engine) -> Figures:
    with engine.connect() as conn:
        totals = {
            r.campaign_id: (int(r.granted_amount), int(r.grants_count))
            for r in conn.execute(sa.select(campaign_totals))
        }
        minutes = {
            (r.campaign_id, r.minute): (int(r.granted_amount), int(r.grants_count))
            for r in conn.execute(sa.select(campaign_minute_totals))
            if (r.granted_amount, r.grants_count) != (0, 0)
        }
    return totals, minutes


def expected_campaigns(engine: Engine) -> dict[str, tuple[int, int, str]]:
    """(version, budget, kind) of each campaign: the fold of its stream in the write store."""
    streams: dict[str, list[AnyCampaignEvent]] = defaultdict(list)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(campaign_events.c.campaign_id, campaign_events.c.body).order_by(
                campaign_events.c.campaign_id, campaign_events.c.version
            )
        )
        for campaign_id, body in rows:
            streams[campaign_id].append(parse_campaign_event(body))
    folded = {c: fold_campaign(events) for c, events in streams.items()}
    return {c: (s.version, s.rules.budget, s.rules.kind) for c, s in folded.items()}


def read_campaigns(engine: Engine) -> dict[str, tuple[int, int, str]]:
    with engine.connect() as conn:
        return {
            r.campaign_id: (int(r.version), int(r.budget), r.kind)
            for r in conn.execute(sa.select(campaigns))
        }


def all_projected(write_engine: Engine, read_engine: Engine) -> bool:
    return (
        read_side_matches(write_engine, read_engine)
        and wallets_match(write_engine, read_engine)
        and read_campaigns(read_engine) == expected_campaigns(write_engine)
        and read_figures(read_engine) == expected_figures(write_grants(write_engine))
    )


async def test_campaigns_and_grants_are_projected_once_and_a_full_run_finds_no_drift(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=30, seed=11)
    recorded = record_campaigns(write_engine, rsettings)
    users = [f"u{n}" for n in range(20)]
    grant_to(write_engine, rsettings, users, at=utcnow() - timedelta(minutes=30))
    registry = CollectorRegistry()
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings, registry=registry)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        # A second round of grants on top of the first, then everything of the campaigns and
        # the grants delivered again, the reconciler's way (marked as a replay).
        grant_to(write_engine, rsettings, users[:7], at=utcnow(), bonus=False)
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        applied = metric(registry, "kessai_projector_events_applied_total")
        again = [*recorded, *write_grants(write_engine)]
        replayed = [
            (key, value, kafka_headers(e.event_type, e.schema_version, e.event_id, replay=True))
            for e in again
            for key, value, _ in [record_parts(e)]
        ]
        duplicates = metric(registry, "kessai_projector_duplicates_total")
        await produce(rsettings.resolved_kafka_bootstrap(), rsettings.topic, replayed)
        await wait_until(
            lambda: (
                metric(registry, "kessai_projector_duplicates_total") >= duplicates + len(again)
            ),
            tasks=tasks,
        )
        result = await Reconciler(
            write_engine=write_engine, read_engine=read_engine, settings=rsettings
        ).run(full=True)
    assert result.outcome == "consistent", result.findings
    assert result.findings == []
    assert metric(registry, "kessai_projector_events_applied_total") == applied
    assert all_projected(write_engine, read_engine)
    totals, _ = read_figures(read_engine)
    assert set(totals) == {"spring", "welcome"}
    assert sum(n for _, n in totals.values()) == len(users) + 7
    assert read_campaigns(read_engine)["spring"] == (2, 600_000, "cashback")
    assert count(read_engine, parked_events) == count(read_engine, dead_letters) == 0
    with read_engine.connect() as conn:
        lines = conn.execute(
            sa.select(wallet_movements.c.campaign_id).where(wallet_movements.c.kind == "reward")
        ).scalars()
        assert sorted(set(lines)) == ["spring", "welcome"]


async def test_a_damaged_grant_on_the_read_side_is_repaired_and_its_figures_stay_exact(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=20, seed=4)
    record_campaigns(write_engine, rsettings)
    grant_to(write_engine, rsettings, ["u1", "u2", "u3", "u4"], at=utcnow())
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        figures = read_figures(read_engine)
        # u1's grant (its newest movement) lost its statement line and its balance; u2's
        # wallet is gone from the read side altogether.
        with read_engine.begin() as conn:
            version, amount = conn.execute(
                sa.select(wallet_movements.c.version, wallet_movements.c.amount)
                .where(wallet_movements.c.user_id == "u1")
                .order_by(wallet_movements.c.version.desc())
                .limit(1)
            ).one()
            conn.execute(
                wallet_movements.delete().where(
                    wallet_movements.c.user_id == "u1", wallet_movements.c.version == version
                )
            )
            conn.execute(
                wallets.update()
                .where(wallets.c.user_id == "u1")
                .values(balance=wallets.c.balance - amount)
            )
            conn.execute(wallets.delete().where(wallets.c.user_id == "u2"))
        dry = await reconciler.run(dry_run=True)
        assert sorted((f.kind, (f.details or {})["user_id"]) for f in dry.findings) == [
            ("wallet_balance", "u1"),
            ("wallet_balance", "u2"),
        ]
        result = await reconciler.run()
        assert result.outcome == "consistent", result.findings
        assert all(f.repaired for f in result.findings)
        assert len(result.findings) == 2
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
    # The grants were applied again, and counted once in all.
    assert read_figures(read_engine) == figures


def take_back_from(engine: Engine, settings: Settings, user_id: str, amount: int) -> None:
    """A take-back of ``amount`` of the user's newest cashback (the wallet's next version), as
    the rewards service appends it after the payment's refund."""
    cashback = [
        g
        for g in write_grants(engine)
        if isinstance(g, RewardGranted) and g.user_id == user_id and g.payload.payment_id
    ][-1]
    with engine.begin() as conn:
        wallet = load_wallets(conn, [user_id])[user_id]
        taken = taken_back(
            cashback,
            amount,
            balance_after=wallet.balance - amount,
            version=wallet.version + 1,
            at=utcnow(),
        )
        book_grants(conn, [taken], shards=settings.outbox_shards)


async def test_a_wallet_with_a_take_back_is_repaired_and_its_campaigns_figures_stay_exact(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    """A cashback and its take-back projected (the campaign's figures net of it), then the
    wallet's read rows lost: the repair re-publishes both, and the figures end where they
    were, neither the grant nor the take-back counted twice."""
    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=5)
    record_campaigns(write_engine, rsettings)
    grant_to(write_engine, rsettings, ["u1", "u2"], at=utcnow())
    take_back_from(write_engine, rsettings, "u1", 40)
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        figures = read_figures(read_engine)
        assert figures[0]["spring"] == (100 - 40, 1)
        with read_engine.begin() as conn:
            conn.execute(wallets.delete().where(wallets.c.user_id == "u1"))
        result = await reconciler.run()
        assert result.outcome == "consistent", result.findings
        assert [(f.kind, f.repaired) for f in result.findings] == [("wallet_balance", True)]
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
    assert read_figures(read_engine) == figures
    with read_engine.connect() as conn:
        line = conn.execute(
            sa.select(wallet_movements.c.amount, wallet_movements.c.campaign_id).where(
                wallet_movements.c.kind == "reward_takeback"
            )
        ).one()
    assert tuple(line) == (-40, "spring")


def dead_letter(settings: Settings, stream: uuid.UUID, version: int, body: bytes) -> dict[str, Any]:
    return {
        "payment_id": stream,
        "version": version,
        "topic": settings.topic,
        "kafka_partition": 0,
        "kafka_offset": 10**9,
        "raw_key": str(stream).encode(),
        "raw_value": body,
        "headers": "{}",
        "reason": "undecodable event: mangled",
        "status": "open",
        "created_at": utcnow(),
    }


async def test_campaign_rows_that_differ_are_repaired_from_their_streams_never_as_payments(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    """A campaign's change lost in transit (a dead letter, the row left at version 1), a row
    gone and a row altered behind the projector's back: each is a ``campaign`` finding, repaired
    by re-publishing the campaign's stream; no payment or wallet is compared or re-published for
    them. A dead letter of a stream no campaign has is reported and left."""
    await asyncio.to_thread(make_traffic, write_engine, payments_count=10, seed=8)
    record_campaigns(write_engine, rsettings)
    grant_to(write_engine, rsettings, ["u1", "u2"], at=utcnow())
    spring, ghost = campaign_stream_id("spring"), campaign_stream_id("ghost")
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=rsettings)
    relay = Relay(engine=write_engine, settings=rsettings)
    projector = Projector(engine=read_engine, settings=rsettings)
    async with running(relay, projector) as tasks:
        await wait_until(lambda: all_projected(write_engine, read_engine), tasks=tasks)
        figures = read_figures(read_engine)
        with read_engine.begin() as conn:
            conn.execute(
                campaigns.update()
                .where(campaigns.c.campaign_id == "spring")
                .values(version=1, budget=500_000)
            )
            conn.execute(dead_letters.insert().values(dead_letter(rsettings, spring, 2, b"{}")))
            conn.execute(campaigns.delete().where(campaigns.c.campaign_id == "welcome"))
        dry = await reconciler.run(dry_run=True)
        assert sorted((f.kind, f.payment_id, f.repaired) for f in dry.findings) == sorted(
            [
                ("dead_letter", spring, False),
                ("campaign", spring, False),
                ("campaign", campaign_stream_id("welcome"), False),
            ]
        ), dry.findings
        by_campaign = {
            str(f.details["campaign_id"]): f.details
            for f in dry.findings
            if f.kind == "campaign" and f.details
        }
        assert by_campaign["spring"] == {
            "campaign_id": "spring",
            "write_version": 2,
            "read_version": 1,
            "write_budget": 600_000,
            "read_budget": 500_000,
        }
        assert by_campaign["welcome"]["read_version"] is None
        result = await reconciler.run(full=True)
        assert result.outcome == "consistent", result.findings
        assert len(result.findings) == 3
        assert all(f.repaired for f in result.findings)
        assert all_projected(write_engine, read_engine)
        assert count(read_engine, dead_letters, dead_letters.c.status == "open") == 0
        with read_engine.begin() as conn:
            conn.execute(dead_letters.insert().values(dead_letter(rsettings, ghost, 1, b"{}")))
        result = await reconciler.run()
        assert [(f.kind, f.payment_id, f.repaired) for f in result.findings] == [
            ("dead_letter", ghost, False)
        ], result.findings
        assert result.outcome == "drift"
    assert read_figures(read_engine) == figures  # a campaign's repair leaves its figures alone
    assert read_campaigns(read_engine) == expected_campaigns(write_engine)


def test_the_migration_adds_and_removes_the_campaign_tables(read_db_url: str) -> None:
    def shape() -> tuple[set[str], bool]:
        engine = sa.create_engine(read_db_url)
        try:
            inspector = sa.inspect(engine)
            tables = set(inspector.get_table_names()) & {
                "campaigns",
                "campaign_totals",
                "campaign_minute_totals",
            }
            columns = {c["name"] for c in inspector.get_columns("wallet_movements")}
            return tables, "campaign_id" in columns
        finally:
            engine.dispose()

    every = {"campaigns", "campaign_totals", "campaign_minute_totals"}
    assert shape() == (every, True)
    command.downgrade(alembic_config("read", read_db_url), "r0006_verified_up_to")
    assert shape() == (set(), False)
    upgrade("read", read_db_url)
    assert shape() == (every, True)


async def test_a_campaign_stream_that_does_not_fold_is_reported_not_repaired(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    """The write store is the truth: a stream it holds that does not fold (a stop with no
    creation before it) is a ``campaign`` finding with the reason, and nothing is re-published."""
    stop = CampaignStopped(
        event_id=new_id(), campaign_id="lonely", version=2, occurred_at=utcnow(),
        recorded_at=utcnow(), actor="admin-1",
    )  # fmt: skip
    with write_engine.begin() as conn:
        append_events(conn, [stop], shards=rsettings.outbox_shards)
    result = await Reconciler(
        write_engine=write_engine, read_engine=read_engine, settings=rsettings
    ).run(full=True)
    assert [(f.kind, f.repaired) for f in result.findings] == [("campaign", False)]
    details = result.findings[0].details or {}
    assert details["campaign_id"] == "lonely"
    assert "does not follow" in str(details["problem"])
    assert result.outcome == "drift"
    assert read_campaigns(read_engine) == {}
