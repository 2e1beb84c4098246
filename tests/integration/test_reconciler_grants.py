"""The reconciler checks the grants: each campaign's budget equals its grants in the write store
(``campaign_budget``, never repaired) and every eligible payment has its grant
(``grant_missing``: reported, and the payment's capture re-published for the rewards service).

Against the real pipeline (write store, relay, broker, projector, read database; SQLite and
MariaDB): payments go through the command handlers, grants through the rewards service's own
transaction (``rewards.store.commit_grants``), and the damage below is rows written straight
into the write store, which no write path does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa
from aiokafka import ConsumerRecord
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.users import registration_command
from command_service.schemas import CreateUser
from kessai.auth import ADMIN
from kessai.clock import utcnow
from kessai.events import PaymentCaptured, kafka_key, parse_any_event, registration_stream_id
from kessai.grants import month_of, payment_facts
from kessai.ids import new_id
from kessai.schema.read import campaign_totals
from kessai.schema.write import campaign_budget, reward_grants, user_registrations
from kessai.settings import Settings
from kessai.write_store import append_events, load_granted
from query_service.app import create_app as create_query_app
from query_service.schemas import ReconciliationRunsOut
from reconciler.records import Finding
from reconciler.service import Reconciler
from rewards.decide import Captured, Credited, Registered
from rewards.store import commit_grants
from tests.helpers import api_key, bearer, consume_all, fund
from tests.integration import test_reconciler_wallets as wallet_tests
from tests.integration.test_reconciler_movements import _policy, pay
from tests.integration.test_reconciler_wallets import everything_matches, kinds, with_pipeline
from tests.pipeline import wait_until, write_store_events
from tests.wallet_streams import created

CAMPAIGN = "grants-20"
TOKYO = ZoneInfo("Asia/Tokyo")
POSTINGS = "the postings to and from the campaign's account are not its total"


@pytest.fixture
def rsettings(pipeline_settings: Settings) -> Settings:
    return pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0.2,
            "reconcile_verify_timeout_seconds": 30.0,
            "reconcile_safety_margin_seconds": 0.5,
            "reconcile_grant_grace_seconds": 0.0,  # the payments below are seconds old
        }
    )


reconciler = wallet_tests.reconciler


def start_campaign(engine: Engine, settings: Settings, *, budget: int = 1_000_000) -> None:
    """20% back, at most 1,000 a payment and 10,000 a month, created two days ago."""
    now = utcnow()
    campaign = created(CAMPAIGN, budget=budget, starts_at=now - timedelta(days=1),
                       ends_at=now + timedelta(days=9), at=now - timedelta(days=2))  # fmt: skip
    with engine.begin() as conn:
        append_events(conn, [campaign], shards=settings.outbox_shards)


def captures(engine: Engine, payment_ids: Sequence[uuid.UUID]) -> list[Captured]:
    """The payments' captures as the rewards service sees them."""
    wanted = set(payment_ids)
    return [
        Captured(payment_facts(e), recorded_at=e.recorded_at)
        for e in write_store_events(engine)
        if isinstance(e, PaymentCaptured) and e.payment_id in wanted
    ]


def grant(engine: Engine, settings: Settings, payment_ids: Sequence[uuid.UUID]) -> None:
    facts = captures(engine, payment_ids)
    commit_grants(engine, facts, shards=settings.outbox_shards, attempts=10)


def paid(engine: Engine, count: int) -> list[uuid.UUID]:
    """``count`` balance payments of 2,000 by users of their own (each earns 400)."""
    users = [f"g-{new_id().hex[-12:]}" for _ in range(count)]
    fund(engine, *users, amount=10_000)
    return [pay(engine, user, 2_000) for user in users]


def problems(findings: Sequence[Finding]) -> list[str]:
    return sorted(
        str((f.details or {})["problem"]) for f in findings if f.kind == "campaign_budget"
    )


async def test_consistent_grants_pass(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    start_campaign(write_engine, rsettings)
    payments = await asyncio.to_thread(paid, write_engine, 4)
    grant(write_engine, rsettings, payments[:2])
    grant(write_engine, rsettings, payments[2:])

    async def body() -> None:
        for full in (True, False):
            result = await reconciler.run(full=full)
            assert result.findings == [], result.findings
            assert result.outcome == "consistent"
            assert result.checks is not None
            assert result.checks["grants"].verified_up_to

    await with_pipeline(rsettings, write_engine, read_engine, body)
    with write_engine.connect() as conn:
        assert load_granted(conn, [CAMPAIGN])[CAMPAIGN].amount == 4 * 400


def grant_row(engine: Engine, amount: int, *, user_id: str = "g-nobody") -> None:
    """A grant row with no wallet event behind it."""
    with engine.begin() as conn:
        conn.execute(
            reward_grants.insert().values(
                campaign_id=CAMPAIGN, user_id=user_id, period=month_of(utcnow(), TOKYO),
                grant_key=str(new_id()), amount=amount, currency="JPY", event_id=new_id(),
                recorded_at=utcnow(),
            )
        )  # fmt: skip


def budget_row(engine: Engine, amount: int) -> None:
    """The campaign's next budget row, ``amount`` more than the newest."""
    with engine.begin() as conn:
        newest = load_granted(conn, [CAMPAIGN])[CAMPAIGN]
        conn.execute(
            campaign_budget.insert().values(
                campaign_id=CAMPAIGN, version=newest.version + 1, amount=amount, grants=0,
                granted_after=newest.amount + amount, recorded_at=utcnow(),
            )
        )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            lambda e: grant_row(e, 100),
            ["a grant row without its wallet event", "the grant rows do not add up to the total"],
        ),
        (
            lambda e: budget_row(e, 1),
            ["the grant rows do not add up to the total", POSTINGS],
        ),
        (
            lambda e: (grant_row(e, 500), budget_row(e, 500)),
            ["a grant row without its wallet event", "granted more than the budget", POSTINGS],
        ),
    ],
    ids=["grant-row-without-event", "budget-off-by-one", "over-budget"],
)
async def test_a_damaged_budget_is_found_and_left_for_an_operator(
    rsettings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    reconciler: Reconciler,
    damage: object,
    expected: list[str],
) -> None:
    start_campaign(write_engine, rsettings, budget=1_000)
    payments = await asyncio.to_thread(paid, write_engine, 2)
    grant(write_engine, rsettings, payments)  # 800 of the 1,000

    async def body() -> None:
        assert (await reconciler.run(full=True)).findings == []
        damage(write_engine)  # type: ignore[operator]
        for full in (True, False):
            result = await reconciler.run(full=full)
            assert result.outcome == "drift"
            # The postings' sums are a full audit's: an incremental run checks them in scope.
            want = sorted(p for p in expected if full or p != POSTINGS)
            assert problems(result.findings) == want, result.findings
            assert set(kinds(result)) == {"campaign_budget"}
            assert not any(f.repaired for f in result.findings)
            assert result.checks is not None
            assert result.checks["grants"].unrepaired > 0

    await with_pipeline(rsettings, write_engine, read_engine, body)


async def admin_runs(settings: Settings) -> dict[str, Any]:
    """``GET /v1/admin/reconciliation/runs`` of the query API, as an admin sees it."""
    app = create_query_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://q",
            headers=bearer(api_key(settings, ADMIN)),
        ) as q,
    ):
        answer = await q.get("/v1/admin/reconciliation/runs")
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    ReconciliationRunsOut.model_validate(page)
    return page


def captured_records(
    records: Sequence[ConsumerRecord[bytes, bytes]], payment_id: uuid.UUID
) -> list[bool]:
    """For each record of ``payment_id``'s capture on the topic: whether it is a replay."""
    found = []
    for record in records:
        headers = {k: bytes(v) for k, v in record.headers}
        if record.key == kafka_key(payment_id) and headers.get("event_type") == b"PaymentCaptured":
            found.append(headers.get("replay") == b"1")
    return found


async def test_a_payment_never_granted_is_found_and_its_capture_republished(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    start_campaign(write_engine, rsettings)
    payments = await asyncio.to_thread(paid, write_engine, 3)
    granted_now, never = payments[:2], payments[2]
    grant(write_engine, rsettings, granted_now)  # the rewards service was down for the third

    async def body() -> None:
        result = await reconciler.run()
        assert result.outcome == "drift"
        (missing,) = result.findings
        assert (missing.kind, missing.payment_id, missing.repaired) == (
            "grant_missing",
            never,
            False,
        )
        assert (missing.details or {})["earns"] == 400
        assert (missing.details or {})["campaign_id"] == CAMPAIGN
        shown = (await admin_runs(rsettings))["items"][0]
        assert shown["checks"]["grants"]["unrepaired"] == 1
        assert [(f["kind"], f["payment_id"]) for f in shown["findings"]] == [
            ("grant_missing", str(never))
        ]
        records = await consume_all(
            rsettings.resolved_kafka_bootstrap(), rsettings.topic, at_least=1, settle=1.0
        )
        assert sorted(captured_records(records, never)) == [False, True]  # the original, again
        assert captured_records(records, granted_now[0]) == [False]
        grant(write_engine, rsettings, [never])  # the rewards service consumes it
        await wait_until(everything_matches(write_engine, read_engine))
        again = await reconciler.run()
        assert again.findings == []
        assert again.outcome == "consistent"

    await with_pipeline(rsettings, write_engine, read_engine, body)


async def test_a_payment_inside_the_grace_period_is_not_reported(
    rsettings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    settings = rsettings.model_copy(update={"reconcile_grant_grace_seconds": 600.0})
    start_campaign(write_engine, settings)
    await asyncio.to_thread(paid, write_engine, 2)
    run = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)

    async def body() -> None:
        result = await run.run(full=True)
        assert result.findings == []
        assert result.outcome == "consistent"
        strict = rsettings.model_copy(update={"reconcile_grant_grace_seconds": 0.0})
        dry = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=strict)
        assert kinds(await dry.run(full=True, dry_run=True)) == {"grant_missing": 2}

    await with_pipeline(settings, write_engine, read_engine, body)


async def test_campaign_figures_that_differ_on_the_read_side_are_rewritten(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    start_campaign(write_engine, rsettings)
    payments = await asyncio.to_thread(paid, write_engine, 3)
    grant(write_engine, rsettings, payments)
    t = campaign_totals.c

    def figures() -> tuple[int, int]:
        with read_engine.connect() as conn:
            row = conn.execute(
                sa.select(t.granted_amount, t.grants_count).where(t.campaign_id == CAMPAIGN)
            ).one()
            return int(row[0]), int(row[1])

    async def body() -> None:
        assert figures() == (1_200, 3)
        with read_engine.begin() as conn:
            conn.execute(
                campaign_totals.update()
                .where(t.campaign_id == CAMPAIGN)
                .values(granted_amount=t.granted_amount + 7, grants_count=t.grants_count - 1)
            )
        result = await reconciler.run()
        (finding,) = result.findings
        assert (finding.kind, finding.repaired, result.outcome) == (
            "campaign_totals",
            True,
            "consistent",
        )
        assert finding.details == {
            "campaign_id": CAMPAIGN, "write_granted": 1_200, "read_granted": 1_207,
            "write_grants": 3, "read_grants": 2,
        }  # fmt: skip
        assert figures() == (1_200, 3)
        assert (await reconciler.run(full=True)).findings == []

    await with_pipeline(rsettings, write_engine, read_engine, body)


def registered(engine: Engine, count: int) -> list[tuple[str, Registered]]:
    """``count`` users registered through the command handlers, as the rewards service sees
    each registration."""
    users = [f"r-{new_id().hex[-12:]}" for _ in range(count)]
    for user in users:
        handlers.record_alone(
            engine, registration_command(policy=_policy(), command=CreateUser(user_id=user))
        )
    with engine.connect() as conn:
        bodies = conn.execute(
            sa.select(user_registrations.c.body).where(user_registrations.c.user_id.in_(users))
        ).scalars()
        events = {e.user_id: e for e in map(parse_any_event, bodies)}
    return [(u, Registered(u, events[u].occurred_at, events[u].recorded_at)) for u in users]


async def test_a_registration_never_granted_its_bonus_is_found_and_republished(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    now = utcnow()
    welcome = created("welcome-500", kind="welcome_bonus", starts_at=now - timedelta(days=1),
                      ends_at=now + timedelta(days=9), at=now - timedelta(days=2))  # fmt: skip
    with write_engine.begin() as conn:
        append_events(conn, [welcome], shards=rsettings.outbox_shards)
    (_, first_fact), (second, second_fact) = registered(write_engine, 2)
    commit_grants(write_engine, [first_fact], shards=rsettings.outbox_shards, attempts=10)

    async def body() -> None:
        result = await reconciler.run()
        (missing,) = result.findings
        assert (missing.kind, missing.payment_id) == (
            "grant_missing",
            registration_stream_id(second),
        )
        assert missing.details is not None
        assert (missing.details["user_id"], missing.details["earns"]) == (second, 500)
        records = await consume_all(
            rsettings.resolved_kafka_bootstrap(), rsettings.topic, at_least=1, settle=1.0
        )
        replays = [
            {k: bytes(v) for k, v in r.headers}.get("replay") == b"1"
            for r in records
            if r.key == kafka_key(registration_stream_id(second))
        ]
        assert sorted(replays) == [False, True]
        commit_grants(write_engine, [second_fact], shards=rsettings.outbox_shards, attempts=10)
        await wait_until(everything_matches(write_engine, read_engine))
        again = await reconciler.run()
        assert again.findings == []
        assert again.outcome == "consistent"

    await with_pipeline(rsettings, write_engine, read_engine, body)


async def test_take_backs_and_debts_are_consistent_grants(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    """Spent cashback refunded. u1: 600 granted on a card payment, 500 of the wallet spent (100
    more granted on that), the card payment refunded: 200 given back, 400 owed, then a top-up
    pays 300 of it. u2: 200 granted, all of it spent, the refund takes nothing (200 owed), then
    the 40 granted on the spending pays 40 of it. The campaign's budget is the postings (940
    granted, 540 back: 400), its rows hold what was due (net 140), and the 260 still owed is the
    difference: no finding in full or incremental runs, and the read side's figures (the
    postings) are left as they are."""
    from tests.integration import test_rewards_takebacks as tb

    tb.create_campaign(write_engine)

    def traffic() -> None:
        card1 = tb.pay(write_engine, 3_000, method="card", user_id="u1")
        card2 = tb.pay(write_engine, 1_000, method="card", user_id="u2")
        tb.commit(write_engine, [card1, card2])
        spent1 = tb.pay(write_engine, 500, user_id="u1")
        tb.commit(write_engine, [spent1])
        spent2 = tb.pay(write_engine, 200, user_id="u2")
        tb.commit(write_engine, [tb.refund(write_engine, card1, 3_000)])
        tb.commit(write_engine, [tb.refund(write_engine, card2, 1_000)])
        tb.commit(write_engine, [tb.top_up(write_engine, 300, user_id="u1")])
        tb.commit(write_engine, [spent2])
        tb.commit(write_engine, [Credited("u2", utcnow())])

    await asyncio.to_thread(traffic)
    assert tb.taken_back(write_engine, "u1") == [("refund", 600, 200, 400), ("debt", 400, 300, 100)]
    assert tb.taken_back(write_engine, "u2") == [("debt", 200, 40, 160)]
    assert tb.granted(write_engine) == 940 - 540

    async def body() -> None:
        for full in (True, False, True):
            result = await reconciler.run(full=full)
            assert result.findings == [], result.findings
            assert result.outcome == "consistent"
        t = campaign_totals.c
        with read_engine.connect() as conn:
            shown = conn.execute(
                sa.select(t.granted_amount, t.grants_count).where(t.campaign_id == "autumn-20")
            ).one()
        assert tuple(shown) == (400, 4)

    await with_pipeline(rsettings, write_engine, read_engine, body)


async def test_a_refunded_payment_never_granted_is_republished_with_its_refunds(
    rsettings: Settings, write_engine: Engine, read_engine: Engine, reconciler: Reconciler
) -> None:
    """The rewards service missed a payment that was then refunded in full. Re-publishing its
    capture alone would grant the cashback of a payment that no longer exists, its refund long
    gone by: the whole history goes out again, in order, so the rewards service grants and
    then takes it all back."""
    from tests.integration.test_reconciler_movements import refund

    start_campaign(write_engine, rsettings)
    (never,) = await asyncio.to_thread(paid, write_engine, 1)
    refund_id = await asyncio.to_thread(refund, write_engine, never, 2_000)

    async def body() -> None:
        result = await reconciler.run()
        (missing,) = result.findings
        assert (missing.kind, missing.payment_id) == ("grant_missing", never)
        records = await consume_all(
            rsettings.resolved_kafka_bootstrap(), rsettings.topic, at_least=1, settle=1.0
        )
        replayed = [
            (parse_any_event(r.value).event_type, r.offset)
            for r in records
            if r.key == kafka_key(never) and dict(r.headers).get("replay") == b"1"
        ]
        assert [t for t, _ in sorted(replayed, key=lambda x: x[1])] == [
            "PaymentCaptured",
            "PaymentRefunded",
        ]
        assert refund_id is not None

    await with_pipeline(rsettings, write_engine, read_engine, body)
