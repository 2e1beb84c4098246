"""The grant transaction (``rewards/store.py``) on the real write stores (SQLite and MariaDB):
a batch applied twice grants once; two transactions racing on one campaign end with the
granted total equal to the sum of the grants, never above the budget, the last grant cut;
the per-user month cap holds when two batches grant one user at once; wallets, statements
(the wallet's movements), outbox rows and the budget's rows say what was granted."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.campaigns import decide_create, parse_rules
from kessai.db import create_db_engine
from kessai.events import RewardGranted, parse_wallet_event, wallet_stream_id
from kessai.grants import PaymentFacts
from kessai.schema.write import (
    campaign_budget,
    campaign_events,
    outbox,
    reward_grants,
    wallet_events,
)
from kessai.settings import Settings
from kessai.write_store import append_events, load_campaigns, load_granted, load_wallets
from rewards.decide import Captured, Fact, Registered
from rewards.store import commit_grants, record_grants
from tests.helpers import fund

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2027, 11, 1, tzinfo=UTC)
SHARDS = 8
CASHBACK: dict[str, Any] = {
    "campaign_id": "autumn-20",
    "name": "20% back",
    "kind": "cashback",
    "currency": "JPY",
    "budget": 1_000_000,
    "starts_at": START.isoformat(),
    "ends_at": END.isoformat(),
    "rate_bp": 2000,
    "cap_per_payment": 1000,
    "cap_per_user_month": 5000,
}


WELCOME: dict[str, Any] = {
    key: CASHBACK[key] for key in ("name", "currency", "budget", "starts_at", "ends_at")
} | {"campaign_id": "welcome", "kind": "welcome_bonus"}


def create_campaign(engine: Engine, base: dict[str, Any] = CASHBACK, **rules: Any) -> None:
    created = decide_create(parse_rules({**base, **rules}), now=START, actor="admin")
    with engine.begin() as conn:
        append_events(conn, [created], shards=SHARDS)


def paid(user_id: str = "u1", amount: int = 3000, at: datetime | None = None) -> Captured:
    captured_at = at or START + timedelta(days=3)
    facts = PaymentFacts(uuid.uuid4(), user_id, "m1", "balance", amount, "JPY", captured_at)
    return Captured(facts, recorded_at=captured_at)


def grant(engine: Engine, facts: Sequence[Fact], **kwargs: Any) -> list[int]:
    decision = commit_grants(
        engine, facts, shards=SHARDS, attempts=kwargs.pop("attempts", 30), **kwargs
    )
    return [g.amount for g in decision.grants]


def granted_rows(engine: Engine) -> list[tuple[str, str, str, str, int]]:
    g = reward_grants.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(g.campaign_id, g.user_id, g.period, g.grant_key, g.amount))
        return sorted((str(c), str(u), str(p), str(k), int(a)) for c, u, p, k, a in rows)


def budget_rows(engine: Engine, campaign_id: str = "autumn-20") -> list[tuple[int, int, int, int]]:
    b = campaign_budget.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(b.version, b.amount, b.grants, b.granted_after)
            .where(b.campaign_id == campaign_id)
            .order_by(b.version)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def rewards_of(engine: Engine, user_id: str) -> list[RewardGranted]:
    w = wallet_events.c
    with engine.connect() as conn:
        bodies = conn.execute(
            sa.select(w.body).where(w.user_id == user_id).order_by(w.version)
        ).scalars()
        return [e for e in map(parse_wallet_event, bodies) if isinstance(e, RewardGranted)]


def test_a_grant_credits_the_wallet_and_records_its_key_budget_and_outbox_row(
    write_engine: Engine, settings: Settings
) -> None:
    fund(write_engine, "u1", amount=1000)
    create_campaign(write_engine)
    payment = paid(amount=2_500)
    assert grant(write_engine, [payment]) == [500]
    with write_engine.connect() as conn:
        wallet = load_wallets(conn, ["u1"])["u1"]
        assert (wallet.balance, wallet.version) == (1_500, 2)
        assert load_granted(conn, ["autumn-20"])["autumn-20"].amount == 500
        published = conn.execute(
            sa.select(outbox.c.payment_id, outbox.c.event_type).where(
                outbox.c.event_type == "RewardGranted"
            )
        ).all()
    assert published == [(wallet_stream_id("u1"), "RewardGranted")]
    (reward,) = rewards_of(write_engine, "u1")
    assert (reward.payload.payment_id, reward.payload.balance_after) == (
        payment.facts.payment_id,
        1_500,
    )
    assert granted_rows(write_engine) == [
        ("autumn-20", "u1", "2026-11", str(payment.facts.payment_id), 500)
    ]
    assert budget_rows(write_engine) == [(1, 500, 1, 500)]


def test_the_same_batch_applied_twice_grants_once(write_engine: Engine) -> None:
    """A redelivered batch (a crash before the offsets were committed, a rebalance, a second
    instance): its keys are found, nothing is appended, not even a budget row."""
    create_campaign(write_engine)
    create_campaign(write_engine, WELCOME)
    batch = [paid("u1"), paid("u2"), Registered("u3", START + timedelta(days=1), START)]
    assert sorted(grant(write_engine, batch)) == [500, 600, 600]
    again = commit_grants(write_engine, batch, shards=SHARDS, attempts=3)
    assert again.grants == []
    assert again.skipped == {"already_granted": 3}
    assert len(granted_rows(write_engine)) == 3
    assert budget_rows(write_engine) == [(1, 1200, 2, 1200)]
    assert budget_rows(write_engine, "welcome") == [(1, 500, 1, 500)]
    assert [r.payload.amount for r in rewards_of(write_engine, "u3")] == [500]


def test_a_second_grant_of_one_key_is_refused_by_the_store_not_by_a_check(
    write_engine: Engine,
) -> None:
    """Two transactions that both found the key missing: the second one's insert fails, so
    it decides again (the retry) and finds the first's grant."""
    create_campaign(write_engine)
    payment = paid()
    url = write_engine.url.render_as_string(hide_password=False)
    mysql = write_engine.dialect.name == "mysql"
    other = create_db_engine(url, pool_size=1)
    attempts: list[int] = []

    def the_same_payment_elsewhere(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        if mysql:
            with other.begin() as theirs:
                record_grants(theirs, [payment], shards=SHARDS, now=START)
        else:  # SQLite holds one writer: the other's rows go in (and out) with ours
            record_grants(conn, [payment], shards=SHARDS, now=START)

    try:
        decision = commit_grants(
            write_engine,
            [payment],
            shards=SHARDS,
            attempts=3,
            before_write=the_same_payment_elsewhere,
        )
    finally:
        other.dispose()
    assert len(attempts) == 2
    assert len(decision.grants) == (0 if mysql else 1)
    assert len(granted_rows(write_engine)) == 1
    assert [r.payload.amount for r in rewards_of(write_engine, "u1")] == [600]
    assert budget_rows(write_engine) == [(1, 600, 1, 600)]


def test_two_transactions_racing_on_one_campaign_never_overspend_it(write_engine: Engine) -> None:
    """A budget of 10,000 and four threads granting 600 each to different users, in rounds of
    four batches of 5 decided at once: the grants add up to exactly the budget, the budget's
    rows chain without a gap, one grant is cut (to 400), the exhaustion is recorded once, and
    the rest get nothing."""
    create_campaign(write_engine, budget=10_000)
    rounds = 3
    batches = [
        [[paid(f"t{t}-r{r}-{j}") for j in range(5)] for r in range(rounds)] for t in range(4)
    ]
    together = threading.Barrier(4)
    retries: list[int] = []
    errors: list[BaseException] = []

    def run(mine: list[list[Fact]]) -> None:
        try:
            for batch in mine:
                together.wait(timeout=30)  # the four batches of a round decide at once
                grant(write_engine, batch, attempts=50, on_retry=lambda: retries.append(1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(batches[t],)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = granted_rows(write_engine)
    assert sum(r[4] for r in rows) == 10_000
    assert sorted(r[4] for r in rows) == [400] + [600] * 16
    chain = budget_rows(write_engine)
    assert [v for v, *_ in chain] == list(range(1, len(chain) + 1))
    assert chain[-1][3] == 10_000 == sum(amount for _, amount, _, _ in chain)
    assert sum(grants for _, _, grants, _ in chain) == 17
    with write_engine.connect() as conn:
        state = load_campaigns(conn, ["autumn-20"])["autumn-20"]
        exhaustions = conn.execute(
            sa.select(sa.func.count()).where(
                campaign_events.c.event_type == "CampaignBudgetExhausted"
            )
        ).scalar_one()
    assert state.exhausted_at is not None
    assert exhaustions == 1
    cut = [
        e for user in {r[1] for r in rows} for e in rewards_of(write_engine, user) if e.payload.cut
    ]
    assert [(e.payload.amount, e.payload.requested) for e in cut] == [(400, 600)]


def test_the_month_cap_holds_when_two_batches_grant_one_user_at_once(write_engine: Engine) -> None:
    """Two transactions each grant the same user 1,000 of a 1,500 month cap from one campaign,
    the second deciding while the first commits: it collides on the wallet's (and the
    budget's) next version, decides again and grants the 500 left."""
    create_campaign(write_engine, cap_per_user_month=1_500)
    first, second = paid(amount=5_000), paid(amount=5_000)
    url = write_engine.url.render_as_string(hide_password=False)
    mysql = write_engine.dialect.name == "mysql"
    other = create_db_engine(url, pool_size=1)
    attempts: list[int] = []

    def first_commits_meanwhile(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        with other.begin() as theirs:
            record_grants(theirs, [first], shards=SHARDS, now=START)

    try:
        if mysql:
            grant(write_engine, [second], before_write=first_commits_meanwhile)
        else:
            # SQLite holds one writer at a time (BEGIN IMMEDIATE): the two take turns.
            grant(write_engine, [first])
            grant(write_engine, [second])
    finally:
        other.dispose()
    assert len(attempts) == (2 if mysql else 0)
    assert sorted(r[4] for r in granted_rows(write_engine)) == [500, 1000]
    rewards = rewards_of(write_engine, "u1")
    assert [(r.version, r.payload.balance_after) for r in rewards] == [(1, 1000), (2, 1500)]


def test_a_registered_user_gets_the_welcome_bonus_once_across_batches(write_engine: Engine) -> None:
    create_campaign(write_engine, WELCOME)
    joined = Registered("u7", START + timedelta(hours=1), START)
    assert grant(write_engine, [joined]) == [500]
    assert grant(write_engine, [joined, Registered("u8", END, END)]) == []
    with write_engine.connect() as conn:
        wallets = load_wallets(conn, ["u7", "u8"])
    assert (wallets["u7"].balance, wallets["u8"].version) == (500, 0)
    assert granted_rows(write_engine) == [("welcome", "u7", "welcome", "user", 500)]


def test_without_campaigns_a_batch_writes_nothing(write_engine: Engine) -> None:
    decision = commit_grants(write_engine, [paid()], shards=SHARDS, attempts=1)
    assert decision.grants == []
    assert granted_rows(write_engine) == []
    with write_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one() == 0
