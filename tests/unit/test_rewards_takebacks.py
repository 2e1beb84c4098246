"""What refunds take back of cashback, and how a spent cashback's debt is paid off, decided in
memory (``rewards/decide.py``), batch after batch against what the batches before recorded:
partial refunds add up to the floor of the proportion, a full refund takes the whole grant, a
refund of an unrewarded payment takes nothing, each campaign takes back its own, a redelivered
refund takes nothing twice, a wallet holding less than is due gives what it holds and owes the
rest, and later credits pay the debts off oldest first. Every movement posts between the
wallet and the campaign, balanced, and no wallet goes below zero."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from prometheus_client import CollectorRegistry

from kessai.campaigns import CampaignState
from kessai.debts import Debts, parse_debts
from kessai.events import RewardGranted, RewardTakenBack
from kessai.postings import campaign_account, imbalance, transfer, user_account
from kessai.wallets import Wallet, apply_movement, movement_of
from kessai.write_store import Granted
from rewards.decide import (
    BatchDecision,
    Before,
    Captured,
    Credited,
    Fact,
    GrantKey,
    Refunded,
    decide_batch,
    keys_of,
    refund_months,
)
from rewards.metrics import RewardsMetrics
from tests.unit.test_rewards_decide import NOW, START, campaign, paid

PAID = START + timedelta(days=3)


def refund(payment: Captured, total: int, n: int = 1) -> Refunded:
    return Refunded(payment.facts.payment_id, uuid.UUID(int=1000 + n), total, PAID)


def topped_up(user_id: str = "u1") -> Credited:
    return Credited(user_id, PAID)


@dataclass
class Store:
    """The write store as the decisions leave it: what ``rewards/store.py`` reads and
    appends, kept in memory so that batches follow each other."""

    campaigns: dict[str, CampaignState]
    wallets: dict[str, Wallet] = field(default_factory=dict)
    rows: dict[GrantKey, int] = field(default_factory=dict)
    granted: dict[str, Granted] = field(default_factory=dict)
    debts: dict[str, Debts] = field(default_factory=dict)
    payments: dict[uuid.UUID, Captured] = field(default_factory=dict)
    events: list[RewardGranted | RewardTakenBack] = field(default_factory=list)

    def wallet(self, user_id: str) -> Wallet:
        return self.wallets.get(user_id, Wallet.empty(user_id))

    def spend(self, user_id: str, amount: int) -> None:
        w = self.wallet(user_id)
        self.wallets[user_id] = Wallet(user_id, "JPY", w.balance - amount, w.version + 1)

    def top_up(self, user_id: str, amount: int) -> Credited:
        w = self.wallet(user_id)
        self.wallets[user_id] = Wallet(user_id, "JPY", w.balance + amount, w.version + 1)
        return topped_up(user_id)

    def run(self, facts: Sequence[Fact]) -> BatchDecision:
        for fact in facts:
            if isinstance(fact, Captured):
                self.payments[fact.facts.payment_id] = fact
        refunded = {f.payment_id for f in facts if isinstance(f, Refunded)}
        payments = {p: self.payments[p].facts for p in refunded if p in self.payments}
        months = refund_months(self.campaigns, payments)
        users = set(self.wallets) | {"u1", "u2"}
        keys = keys_of(self.campaigns, facts)
        before = Before(
            campaigns=self.campaigns,
            existing=frozenset(k for k in keys if k in self.rows),
            granted=dict(self.granted),
            wallets={u: self.wallet(u) for u in users},
            month_sums={},
            payments=payments,
            refund_rows={k: a for k, a in self.rows.items() if k[:3] in months},
            debts={u: self.debts.get(u, Debts.none(u)) for u in users},
        )
        decision = decide_batch(facts, before, now=NOW)
        for event in decision.wallet_events:
            wallet = self.wallet(event.user_id)
            self.wallets[event.user_id] = apply_movement(wallet, movement_of(event))
            assert event.postings is not None
            assert imbalance(event.postings) == 0
            self.events.append(event)
        for row in decision.grant_rows:
            key = (row["campaign_id"], row["user_id"], row["period"], row["grant_key"])
            assert key not in self.rows  # the primary key
            self.rows[key] = row["amount"]
        for row in decision.budget_rows:
            assert row["version"] == self.granted.get(row["campaign_id"], Granted(0, 0)).version + 1
            self.granted[row["campaign_id"]] = Granted(row["version"], row["granted_after"])
        for row in decision.debt_rows:
            debts = parse_debts(row["user_id"], row["version"], row["currency"], row["body"])
            assert debts.total == row["owed_after"]
            self.debts[row["user_id"]] = debts
        return decision

    def total(self, campaign_id: str = "autumn-20") -> int:
        return self.granted[campaign_id].amount

    def owed(self, user_id: str = "u1") -> int:
        return self.debts.get(user_id, Debts.none(user_id)).total


def cashback(**changes: object) -> CampaignState:
    return campaign(cap_per_payment=10_000, cap_per_user_month=100_000, **changes)


def test_partial_refunds_take_back_the_floor_of_the_proportion_in_total() -> None:
    """A grant of 600 on 3,001 yen, refunded in pieces of 7, 1,000, 1, 993 and 1,000 yen:
    after each refund, what all of them took back is ``floor(600 * refunded / 3001)``, and
    the last one (the whole payment refunded) leaves nothing of the grant."""
    store = Store({"autumn-20": cashback()})
    payment = paid(1, amount=3001)
    store.run([payment])
    assert store.wallet("u1").balance == 600
    refunded = 0
    skipped = []
    for n, piece in enumerate([7, 1000, 1, 993, 1000]):
        refunded += piece
        skipped.append(store.run([refund(payment, refunded, n)]).skipped)
        taken = 600 - store.wallet("u1").balance
        assert taken == 600 * refunded // 3001
        assert store.total() == 600 - taken
        assert sum(a for k, a in store.rows.items()) == 600 - taken
    assert store.wallet("u1").balance == 0
    assert store.total() == 0
    assert [dict(s) for s in skipped] == [{}, {}, {"nothing_due": 1}, {}, {}]
    dues = [e.payload.due for e in store.events if isinstance(e, RewardTakenBack)]
    assert dues == [1, 200, 199, 200]  # the 1 yen refunded after 1,007 rounds to nothing more


def test_a_full_refund_takes_back_the_whole_grant_from_the_wallet_to_the_campaign() -> None:
    store = Store({"autumn-20": cashback()}, wallets={"u1": Wallet("u1", "JPY", 1000, 3)})
    payment = paid(1)
    store.run([payment])
    decision = store.run([refund(payment, 3000)])
    (event,) = decision.wallet_events
    assert isinstance(event, RewardTakenBack)
    p = event.payload
    assert (event.version, p.kind, p.due, p.amount, p.owed, p.balance_after) == (
        5,
        "refund",
        600,
        600,
        0,
        1000,
    )
    assert event.postings == transfer(user_account("u1"), campaign_account("autumn-20"), 600)
    assert movement_of(event).kind == "reward_takeback"
    (row,) = decision.grant_rows
    assert (row["grant_key"], row["amount"], row["event_id"]) == (
        f"{uuid.UUID(int=1)}/{uuid.UUID(int=1001)}",
        -600,
        event.event_id,
    )
    assert [
        (r["version"], r["amount"], r["grants"], r["granted_after"]) for r in decision.budget_rows
    ] == [(2, -600, 0, 0)]
    assert decision.debt_rows == []


def test_a_refund_of_an_unrewarded_payment_takes_nothing_back() -> None:
    store = Store({"autumn-20": cashback()}, wallets={"u1": Wallet("u1", "JPY", 1000, 3)})
    card = paid(1, method="card")  # the campaign rewards balance payments only
    store.run([card])
    decision = store.run([refund(card, 3000), refund(paid(2), 3000, 2)])  # 2: never captured
    assert decision == BatchDecision()
    assert store.wallet("u1").balance == 1000


def test_each_campaign_takes_back_its_own_cashback_of_one_refund() -> None:
    other = cashback(campaign_id="winter-10", rate_bp=1000, merchants=None)
    store = Store({"autumn-20": cashback(), "winter-10": other})
    payment = paid(1)
    store.run([payment])
    assert store.wallet("u1").balance == 600 + 300
    decision = store.run([refund(payment, 1000)])
    assert [(t.campaign_id, t.due) for t in decision.taken_back] == [
        ("autumn-20", 200),
        ("winter-10", 100),
    ]
    assert (store.total("autumn-20"), store.total("winter-10")) == (400, 200)
    assert store.wallet("u1").balance == 600


def test_a_redelivered_refund_takes_nothing_twice() -> None:
    store = Store({"autumn-20": cashback()})
    payment = paid(1)
    store.run([payment])
    first = refund(payment, 1500)
    assert [t.due for t in store.run([first, first]).taken_back] == [300]
    again = store.run([first])
    assert again.wallet_events == []
    assert again.grant_rows == []
    assert again.budget_rows == []
    assert again.skipped == {"already_taken_back": 1}
    assert store.wallet("u1").balance == 300


def test_a_payment_and_its_refund_in_one_batch_grant_then_take_back() -> None:
    store = Store({"autumn-20": cashback()})
    payment = paid(1)
    decision = store.run([payment, refund(payment, 3000)])
    assert [e.event_type for e in decision.wallet_events] == ["RewardGranted", "RewardTakenBack"]
    assert store.wallet("u1").balance == 0
    assert [(r["grants"], r["granted_after"]) for r in decision.budget_rows] == [(1, 0)]


def test_a_wallet_holding_less_than_is_due_gives_what_it_holds_and_owes_the_rest() -> None:
    """600 granted, 450 of it spent: a full refund takes the 150 left and records 450 owed.
    The month's net grants count the whole due (the user is entitled to nothing of it); the
    budget only what came back, so it always equals the postings."""
    store = Store({"autumn-20": cashback()})
    payment = paid(1)
    store.run([payment])
    store.spend("u1", 450)
    decision = store.run([refund(payment, 3000)])
    (event,) = decision.wallet_events
    assert isinstance(event, RewardTakenBack)
    assert (event.payload.due, event.payload.amount, event.payload.owed) == (600, 150, 450)
    assert store.wallet("u1").balance == 0
    assert store.owed() == 450
    assert store.total() == 450
    assert sum(store.rows.values()) == 0
    (debt_row,) = decision.debt_rows
    assert (debt_row["version"], debt_row["owed_after"], debt_row["currency"]) == (1, 450, "JPY")


def test_an_empty_wallet_moves_not_and_its_whole_due_is_owed() -> None:
    store = Store({"autumn-20": cashback()})
    payment = paid(1)
    store.run([payment])
    store.spend("u1", 600)
    decision = store.run([refund(payment, 1500)])
    assert decision.wallet_events == []
    assert decision.budget_rows == []  # nothing came back
    (row,) = decision.grant_rows
    assert row["amount"] == -300
    assert store.owed() == 300


def test_later_credits_pay_off_the_debts_oldest_first() -> None:
    """Two refunds leave 300 then 200 owed; a top-up of 400 pays the first in full and 100 of
    the second, a second top-up the last 100; a refund while debts are open pays them first."""
    store = Store({"autumn-20": cashback()})
    first, second = paid(1), paid(2, amount=2000)
    store.run([first, second])
    store.spend("u1", 1000)
    store.run([refund(first, 1500, 1), refund(second, 1000, 2)])
    assert [(d.payment_id.int, d.owed) for d in store.debts["u1"].items] == [(1, 300), (2, 200)]
    decision = store.run([store.top_up("u1", 400)])
    assert [(t.kind, t.payment_id.int, t.due, t.amount, t.owed) for t in decision.taken_back] == [
        ("debt", 1, 300, 300, 0),
        ("debt", 2, 200, 100, 100),
    ]
    assert store.wallet("u1").balance == 0
    assert [(d.payment_id.int, d.owed) for d in store.debts["u1"].items] == [(2, 100)]
    assert store.debts["u1"].version == 2
    decision = store.run([store.top_up("u1", 1000)])
    assert [(t.due, t.amount, t.owed) for t in decision.taken_back] == [(100, 100, 0)]
    assert store.owed() == 0
    assert store.wallet("u1").balance == 900
    assert store.total() == 600 + 400 - 300 - 200
    nothing_owed = store.run([topped_up()])
    assert (nothing_owed.wallet_events, nothing_owed.budget_rows, nothing_owed.debt_rows) == (
        [],
        [],
        [],
    )


def test_a_refund_with_debts_open_pays_them_before_taking_its_own_share() -> None:
    store = Store({"autumn-20": cashback()})
    first, second = paid(1), paid(2, amount=2000)
    store.run([first, second])
    store.spend("u1", 1000)
    store.run([refund(first, 3000, 1)])  # 600 owed
    store.top_up("u1", 700)  # its credit not read yet
    decision = store.run([refund(second, 2000, 2)])
    assert [(t.kind, t.due, t.amount, t.owed) for t in decision.taken_back] == [
        ("debt", 600, 600, 0),
        ("refund", 400, 100, 300),
    ]
    assert [(d.payment_id.int, d.owed) for d in store.debts["u1"].items] == [(2, 300)]


def test_take_backs_and_debts_are_counted_into_the_metrics() -> None:
    registry = CollectorRegistry()
    metrics = RewardsMetrics(registry)
    store = Store({"autumn-20": cashback()})
    payment = paid(1)
    store.run([payment])
    store.spend("u1", 500)
    metrics.count(store.run([refund(payment, 3000)]), 0.01)
    metrics.count(store.run([store.top_up("u1", 200)]), 0.01)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    taken = "kessai_rewards_taken_back_minor_units_total"
    assert sample(taken, campaign="autumn-20", kind="refund") == 100
    assert sample(taken, campaign="autumn-20", kind="debt") == 200
    assert sample("kessai_rewards_owed_minor_units_total", campaign="autumn-20") == 500
    assert sample("kessai_rewards_budget_remaining", campaign="autumn-20") == 1_000_000 - 300


def test_a_credit_to_a_user_who_owes_nothing_needs_not_even_the_wallet() -> None:
    """The transaction reads the wallets of the users who owe, not of every user credited: a
    credit in a batch that grants to others decides nothing for its user."""
    before = Before(
        campaigns={"autumn-20": cashback()},
        existing=frozenset(),
        granted={},
        wallets={"u2": Wallet.empty("u2")},
        month_sums={},
        debts={"u1": Debts.none("u1")},
    )
    decision = decide_batch([topped_up("u1"), paid(1, user_id="u2")], before, now=NOW)
    assert [(g.user_id, g.amount) for g in decision.grants] == [("u2", 600)]
    assert decision.taken_back == []
