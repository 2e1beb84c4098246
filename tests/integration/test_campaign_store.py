"""The write store's campaign tables (kessai/write_store.py, migration w0005): a campaign is a
stream of events published like any other, what it has granted is its newest budget row, a grant
is one row per (campaign, payment) or (campaign, user), and the database refuses what no writer
may do: rewrite or remove any of them, record two events or budget rows at one version, a
second grant under one key, or a total granted below zero."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.campaigns import (
    CampaignChange,
    campaign_stream_id,
    decide_change,
    decide_create,
    decide_stop,
    parse_rules,
)
from kessai.clock import utcnow
from kessai.ids import new_id
from kessai.schema.write import campaign_budget, campaign_events, outbox, reward_grants
from kessai.write_store import Granted, append_events, load_campaigns, load_granted

NOW = datetime(2026, 11, 15, 3, 0, tzinfo=UTC)
RULES: dict[str, Any] = {
    "campaign_id": "cb-2026",
    "name": "20% back",
    "kind": "cashback",
    "currency": "JPY",
    "budget": 1_000_000,
    "starts_at": "2026-11-01T00:00:00+09:00",
    "ends_at": "2026-12-01T00:00:00+09:00",
    "rate_bp": 2000,
    "cap_per_payment": 1_000,
    "cap_per_user_month": 5_000,
}


def create(engine: Engine, campaign_id: str = "cb-2026") -> None:
    rules = parse_rules({**RULES, "campaign_id": campaign_id})
    with engine.begin() as conn:
        append_events(conn, [decide_create(rules, now=NOW, actor="admin-key")], shards=4)


def budget_row(version: int, amount: int, granted_after: int) -> dict[str, Any]:
    return {
        "campaign_id": "cb-2026",
        "version": version,
        "amount": amount,
        "grants": 1,
        "granted_after": granted_after,
        "recorded_at": utcnow(),
    }


def grant_row(grant_key: str, amount: int = 200) -> dict[str, Any]:
    return {
        "campaign_id": "cb-2026",
        "user_id": "u1",
        "period": "2026-11",
        "grant_key": grant_key,
        "amount": amount,
        "currency": "JPY",
        "event_id": new_id(),
        "recorded_at": utcnow(),
    }


def test_a_campaign_is_a_published_stream_folded_on_read(write_engine: Engine) -> None:
    create(write_engine)
    create(write_engine, "another")
    with write_engine.begin() as conn:
        state = load_campaigns(conn, {"cb-2026"})["cb-2026"]
        change = decide_change(
            state, CampaignChange(budget=2_000_000), granted=0, now=NOW, actor="admin-key"
        )
        append_events(conn, [change], shards=4)
        stop = decide_stop(load_campaigns(conn)["cb-2026"], now=NOW, actor="admin-key")
        append_events(conn, [stop], shards=4)
    with write_engine.connect() as conn:
        every = load_campaigns(conn)
        published = conn.execute(
            sa.select(outbox.c.payment_id, outbox.c.version, outbox.c.event_type).order_by(
                outbox.c.payment_id, outbox.c.version
            )
        ).all()
        assert load_campaigns(conn, set()) == {}
    assert set(every) == {"cb-2026", "another"}
    assert every["cb-2026"].rules.budget == 2_000_000
    assert every["cb-2026"].stopped_at == NOW
    assert every["cb-2026"].version == 3
    assert every["another"].version == 1
    stream = campaign_stream_id("cb-2026")
    assert [(v, t) for s, v, t in published if s == stream] == [
        (1, "CampaignCreated"),
        (2, "CampaignChanged"),
        (3, "CampaignStopped"),
    ]


def test_two_writers_of_one_campaigns_next_version_collide(write_engine: Engine) -> None:
    create(write_engine)
    with write_engine.connect() as conn:
        state = load_campaigns(conn)["cb-2026"]
    first = decide_stop(state, now=NOW, actor="admin-a")
    second = decide_change(
        state, CampaignChange(budget=3_000_000), granted=0, now=NOW, actor="admin-b"
    )
    with write_engine.begin() as conn:
        append_events(conn, [first], shards=4)
    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        append_events(conn, [second], shards=4)
    with write_engine.connect() as conn:
        assert load_campaigns(conn)["cb-2026"].rules.budget == 1_000_000


def test_what_a_campaign_granted_is_its_newest_budget_row(write_engine: Engine) -> None:
    with write_engine.begin() as conn:
        assert load_granted(conn, {"cb-2026"}) == {"cb-2026": Granted(version=0, amount=0)}
        conn.execute(
            campaign_budget.insert(),
            [budget_row(1, 400, 400), budget_row(2, 600, 1_000), budget_row(3, -100, 900)],
        )
    with write_engine.connect() as conn:
        assert load_granted(conn, {"cb-2026", "none"}) == {
            "cb-2026": Granted(version=3, amount=900),
            "none": Granted(version=0, amount=0),
        }
    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        conn.execute(campaign_budget.insert(), [budget_row(3, 100, 1_000)])
    # MariaDB reports a failed CHECK as error 4025 (OperationalError), SQLite as IntegrityError.
    with pytest.raises(sa.exc.DBAPIError, match="granted_after"), write_engine.begin() as conn:
        conn.execute(campaign_budget.insert(), [budget_row(4, -1_000, -100)])


def test_a_second_grant_under_one_key_is_refused(write_engine: Engine) -> None:
    with write_engine.begin() as conn:
        conn.execute(reward_grants.insert(), [grant_row("p-1"), grant_row("p-2")])
    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        conn.execute(reward_grants.insert(), [grant_row("p-1", 999)])
    with write_engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(reward_grants.c.amount))).scalar_one()
    assert total == 400


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE campaign_events SET body = '{}'",
        "DELETE FROM campaign_events",
        "UPDATE campaign_budget SET granted_after = 0",
        "DELETE FROM campaign_budget WHERE version = 1",
        "UPDATE reward_grants SET amount = 0",
        "DELETE FROM reward_grants",
    ],
)
def test_campaign_tables_are_append_only(write_engine: Engine, statement: str) -> None:
    create(write_engine)
    with write_engine.begin() as conn:
        conn.execute(campaign_budget.insert(), [budget_row(1, 200, 200)])
        conn.execute(reward_grants.insert(), [grant_row("p-1")])
    with pytest.raises(sa.exc.DBAPIError) as refused, write_engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert "append-only" in str(refused.value.orig)
    with write_engine.connect() as conn:
        counts = [
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (campaign_events, campaign_budget, reward_grants)
        ]
    assert counts == [1, 1, 1]
