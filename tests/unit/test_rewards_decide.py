"""The grants of one batch, decided in memory (``rewards/decide.py``): the rules' caps and
window, the month cap across payments of one batch, the budget's last grant cut and the
exhaustion recorded, keys already granted skipped, a second campaign, the welcome bonus once
per user, and a wallet in another currency left alone."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kessai.campaigns import (
    CampaignBudgetExhausted,
    CampaignState,
    apply_campaign_event,
    decide_create,
    decide_stop,
    fold_campaign,
    parse_rules,
)
from kessai.grants import PaymentFacts
from kessai.ledger import InvariantViolation
from kessai.postings import campaign_account, imbalance, transfer, user_account
from kessai.wallets import Wallet, apply_movement, fold_wallet, movement_of
from kessai.write_store import Granted
from rewards.decide import (
    BatchDecision,
    Before,
    Captured,
    Fact,
    GrantKey,
    Registered,
    decide_batch,
    key_of,
    keys_of,
)
from rewards.metrics import RewardsMetrics

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
NOW = START + timedelta(days=5)
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
    "cap_per_user_month": 1500,
    "min_payment_amount": 100,
    "methods": ["balance"],
    "merchants": ["m1", "m2"],
}
WELCOME: dict[str, Any] = {
    "campaign_id": "welcome-500",
    "name": "500 yen to join",
    "kind": "welcome_bonus",
    "currency": "JPY",
    "budget": 1_000_000,
    "starts_at": START.isoformat(),
    "ends_at": END.isoformat(),
}


def campaign(rules: Mapping[str, Any] = CASHBACK, **changes: Any) -> CampaignState:
    return fold_campaign([decide_create(parse_rules({**rules, **changes}), now=START, actor="a")])


def paid(n: int = 1, **changes: Any) -> Captured:
    facts: dict[str, Any] = {
        "payment_id": uuid.UUID(int=n),
        "user_id": "u1",
        "merchant_id": "m1",
        "method": "balance",
        "amount": 3000,
        "currency": "JPY",
        "captured_at": START + timedelta(days=3),
        **changes,
    }
    return Captured(PaymentFacts(**facts), recorded_at=facts["captured_at"])


def joined(user_id: str = "u9", at: datetime = START + timedelta(days=1)) -> Registered:
    return Registered(user_id=user_id, registered_at=at, recorded_at=at)


def decide(
    facts: Sequence[Fact],
    *campaigns: CampaignState,
    existing: frozenset[GrantKey] = frozenset(),
    granted: Mapping[str, Granted] | None = None,
    wallets: Mapping[str, Wallet] | None = None,
    month_sums: Mapping[tuple[str, str, str], int] | None = None,
) -> BatchDecision:
    states = {c.campaign_id: c for c in campaigns or (campaign(),)}
    users = {f.facts.user_id if isinstance(f, Captured) else f.user_id for f in facts}
    before = Before(
        campaigns=states,
        existing=existing,
        granted=granted or {},
        wallets={u: Wallet.empty(u) for u in users} | dict(wallets or {}),
        month_sums=month_sums or {},
    )
    return decide_batch(facts, before, now=NOW)


def amounts(decision: BatchDecision) -> list[int]:
    return [g.amount for g in decision.grants]


def test_a_grant_is_the_wallets_next_movement_posted_from_the_campaign() -> None:
    wallet = Wallet(user_id="u1", currency="JPY", balance=700, version=4)
    decision = decide([paid(1)], wallets={"u1": wallet})
    (event,) = decision.wallet_events
    assert (event.version, event.payload.amount, event.payload.balance_after) == (5, 600, 1300)
    assert event.postings == transfer(campaign_account("autumn-20"), user_account("u1"), 600)
    assert imbalance(event.postings) == 0
    assert apply_movement(wallet, movement_of(event)).balance == 1300
    (row,) = decision.grant_rows
    assert (row["period"], row["grant_key"], row["event_id"]) == (
        "2026-11",
        str(uuid.UUID(int=1)),
        event.event_id,
    )
    assert decision.budget_rows == [
        {
            "campaign_id": "autumn-20",
            "version": 1,
            "amount": 600,
            "grants": 1,
            "granted_after": 600,
            "recorded_at": NOW,
        }
    ]


@pytest.mark.parametrize(
    ("fact", "reason"),
    [
        (paid(amount=99), "below_minimum"),
        (paid(method="card"), "method"),
        (paid(merchant_id="m3"), "merchant"),
        (paid(currency="USD"), "currency"),
        (paid(captured_at=END), "ended"),
        (paid(captured_at=START - timedelta(microseconds=1)), "not_started"),
    ],
)
def test_an_ineligible_payment_earns_nothing_and_says_why(fact: Captured, reason: str) -> None:
    decision = decide([fact])
    assert decision.grants == []
    assert decision.budget_rows == []
    assert decision.wallet_events == []
    assert decision.skipped == {reason: 1}


def test_the_window_ends_one_microsecond_after_its_last_eligible_instant() -> None:
    decision = decide(
        [paid(1, captured_at=END - timedelta(microseconds=1)), paid(2, captured_at=END)]
    )
    assert amounts(decision) == [600]
    assert decision.grants[0].user_id == "u1"
    assert decision.skipped == {"ended": 1}


def test_the_caps_per_payment_and_per_user_month_hold_within_one_batch() -> None:
    """20% of 10,000 is capped at 1,000 per payment; the second payment meets the user's
    1,500 of the month (it sees the first one of the same batch); the third gets nothing; a
    payment of the next month (in Tokyo: 15:00 UTC on the 30th is December there) starts a new
    month."""
    december_in_tokyo = datetime(2026, 11, 30, 15, tzinfo=UTC)
    facts = [
        paid(1, amount=10_000),
        paid(2, amount=10_000),
        paid(3),
        paid(4, captured_at=december_in_tokyo),
    ]
    decision = decide(facts, campaign(ends_at="2027-01-01T00:00:00+00:00"))
    assert amounts(decision) == [1000, 500, 600]
    assert [g.requested for g in decision.grants] == [1000, 500, 600]
    assert [r["period"] for r in decision.grant_rows] == ["2026-11", "2026-11", "2026-12"]
    assert decision.skipped == {"month_cap_reached": 1}


def test_the_month_cap_counts_what_earlier_batches_granted() -> None:
    decision = decide([paid(1)], month_sums={("autumn-20", "u1", "2026-11"): 1200})
    assert amounts(decision) == [300]


def test_a_key_already_granted_is_skipped_and_not_counted_against_anything() -> None:
    key = key_of(campaign(), paid(1))
    assert key is not None
    decision = decide([paid(1), paid(1), paid(2)], existing=frozenset({key}))
    assert amounts(decision) == [600]
    assert decision.skipped == {"already_granted": 2}
    assert decision.grant_rows[0]["grant_key"] == str(uuid.UUID(int=2))


def test_the_last_grant_is_cut_to_the_budget_and_the_campaign_is_exhausted() -> None:
    """999,000 of 1,000,000 granted before: 600 fits, the next is cut to 400 (requested 600),
    the exhaustion is recorded at the campaign's next version, and nothing more is granted."""
    facts = [paid(1, user_id="a"), paid(2, user_id="b"), paid(3, user_id="c")]
    decision = decide(facts, granted={"autumn-20": Granted(version=7, amount=999_000)})
    assert [(g.amount, g.requested) for g in decision.grants] == [(600, 600), (400, 600)]
    assert decision.wallet_events[1].payload.cut
    assert decision.skipped == {"exhausted": 1}
    assert decision.remaining == {"autumn-20": 0}
    assert decision.exhausted == {"autumn-20"}
    (exhausted,) = decision.campaign_events
    assert isinstance(exhausted, CampaignBudgetExhausted)
    assert (exhausted.version, exhausted.actor) == (2, "rewards")
    assert (exhausted.payload.granted, exhausted.payload.budget) == (1_000_000, 1_000_000)
    assert decision.budget_rows[0] | {"recorded_at": None} == {
        "campaign_id": "autumn-20",
        "version": 8,
        "amount": 1000,
        "grants": 2,
        "granted_after": 1_000_000,
        "recorded_at": None,
    }


def test_an_exhausted_campaign_grants_nothing_even_after_a_budget_raise() -> None:
    state = campaign()
    exhausted = CampaignBudgetExhausted(
        event_id=uuid.uuid4(),
        campaign_id=state.campaign_id,
        version=2,
        occurred_at=NOW,
        recorded_at=NOW,
        actor="rewards",
        payload={"granted": 1_000_000, "budget": 1_000_000},
    )
    decision = decide([paid(1)], apply_campaign_event(state, exhausted))
    assert decision.grants == []
    assert decision.campaign_events == []
    assert decision.skipped == {"exhausted": 1}


def test_a_stopped_campaign_grants_what_was_captured_before_its_stop_only() -> None:
    stop_at = START + timedelta(days=4)
    stopped = apply_campaign_event(campaign(), decide_stop(campaign(), now=stop_at, actor="a"))
    decision = decide(
        [paid(1, captured_at=stop_at - timedelta(seconds=1)), paid(2, captured_at=stop_at)], stopped
    )
    assert amounts(decision) == [600]
    assert decision.skipped == {"stopped": 1}


def test_two_campaigns_grant_one_payment_each_under_its_own_key() -> None:
    other = campaign(campaign_id="winter-10", rate_bp=1000, merchants=None)
    decision = decide([paid(1)], campaign(), other)
    assert sorted((g.campaign_id, g.amount) for g in decision.grants) == [
        ("autumn-20", 600),
        ("winter-10", 300),
    ]
    assert [e.version for e in decision.wallet_events] == [1, 2]
    assert [e.payload.balance_after for e in decision.wallet_events] == [600, 900]
    assert len(keys_of({"a": campaign(), "b": other}, [paid(1)])) == 2
    assert [r["campaign_id"] for r in decision.budget_rows] == ["autumn-20", "winter-10"]


def test_the_welcome_bonus_is_granted_once_per_user_inside_its_window() -> None:
    bonus = campaign(WELCOME)
    facts = [joined("u9"), joined("u9"), joined("u8", at=END), joined("u7"), paid(1)]
    decision = decide(facts, bonus, campaign())
    assert sorted((g.campaign_id, g.user_id, g.amount) for g in decision.grants) == [
        ("autumn-20", "u1", 600),
        ("welcome-500", "u7", 500),
        ("welcome-500", "u9", 500),
    ]
    assert decision.skipped == {"already_granted": 1, "ended": 1}
    welcome_rows = [r for r in decision.grant_rows if r["campaign_id"] == "welcome-500"]
    assert {(r["period"], r["grant_key"]) for r in welcome_rows} == {("welcome", "user")}
    bonus_event = next(e for e in decision.wallet_events if e.user_id == "u9")
    assert (bonus_event.payload.kind, bonus_event.payload.payment_id) == ("welcome_bonus", None)


def test_a_wallet_in_another_currency_gets_nothing_and_its_balance_limit_refuses_nothing() -> None:
    usd = Wallet(user_id="u1", currency="USD", balance=5, version=1)
    rich = Wallet(user_id="u2", currency="JPY", balance=10**12, version=3)
    decision = decide([paid(1), paid(2, user_id="u2")], wallets={"u1": usd, "u2": rich})
    assert [(g.user_id, g.amount) for g in decision.grants] == [("u2", 600)]
    assert decision.skipped == {"wallet_currency": 1}


def test_the_movements_of_one_wallet_in_a_batch_follow_each_other() -> None:
    other = campaign(campaign_id="winter-10", merchants=None)
    decision = decide([paid(1), paid(2, amount=1000)], campaign(), other)
    wallet = fold_wallet("u1", [movement_of(e) for e in decision.wallet_events])
    assert wallet.balance == sum(amounts(decision)) == 600 + 600 + 200 + 200
    with pytest.raises(InvariantViolation):
        fold_wallet("u1", [movement_of(e) for e in decision.wallet_events[::-1]])


def test_a_batch_is_counted_into_the_metrics_by_campaign_kind_and_reason() -> None:
    registry = CollectorRegistry()
    metrics = RewardsMetrics(registry)
    facts = [paid(1, user_id="a"), paid(2, user_id="b", method="card"), joined("c"), paid(3)]
    decision = decide(
        facts,
        campaign(WELCOME),
        campaign(),
        granted={"autumn-20": Granted(version=3, amount=999_000)},
    )
    metrics.count(decision, 0.02)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("kessai_rewards_grants_total", campaign="autumn-20", kind="cashback") == 2
    assert sample("kessai_rewards_grants_total", campaign="welcome-500", kind="welcome_bonus") == 1
    assert sample("kessai_rewards_granted_minor_units_total", campaign="autumn-20") == 1000
    assert sample("kessai_rewards_skipped_total", reason="method") == 1
    assert sample("kessai_rewards_budget_remaining", campaign="autumn-20") == 0
    assert sample("kessai_rewards_budget_remaining", campaign="welcome-500") == 999_500
    assert sample("kessai_rewards_exhausted_campaigns") == 1
    # Payments recorded on day 3, registrations on day 1, granted on day 5.
    assert sample("kessai_rewards_grant_lag_seconds_count") == 3
    assert sample("kessai_rewards_grant_lag_seconds_sum") == (2 * 2 + 4) * 86_400
