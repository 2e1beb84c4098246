"""The grants of one batch of events, decided in memory, without I/O.

The batch's transaction (``rewards/store.py``) reads what the decision depends on, once per
batch: every campaign, the grants already recorded under the batch's keys, what each campaign
has granted, the wallets of the users the batch touches and what each of them was granted in
the months the batch touches. ``decide_batch`` then walks the events in order and, for each
event and each campaign, asks ``kessai.grants`` whether it earns and how much, and advances
what it read as it goes: two payments of one user in one batch see each other against the
month's cap, and the budget's remainder shrinks grant by grant, so the grant it no longer
covers is cut to what is left (``cut_to_budget``; ``requested`` keeps what the rules gave), the
campaign records ``CampaignBudgetExhausted`` and grants nothing more.

What it decides is what the transaction appends: one ``RewardGranted`` per grant (the wallet's
next movement, posting ``campaign:<id>`` -> ``user:<id>``), one ``reward_grants`` row per grant
(its primary key is the grant's key: a second grant of one payment, or of one user's welcome
bonus, by one campaign is refused by the store), one ``campaign_budget`` row per campaign that
granted (the total after the batch, at the version after the one read) and the exhaustions.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kessai.campaigns import (
    AnyCampaignEvent,
    CampaignState,
    CashbackRules,
    WelcomeBonusRules,
    apply_campaign_event,
)
from kessai.events import RewardGranted, RewardGrantedPayload, RewardKind
from kessai.grants import (
    Grant,
    Ineligible,
    PaymentFacts,
    cashback,
    cut_to_budget,
    decide_exhausted,
    month_of,
    welcome_bonus,
    window_reason,
)
from kessai.ids import new_id
from kessai.postings import campaign_account, transfer, user_account
from kessai.wallets import Wallet, apply_movement, movement_of
from kessai.write_store import Granted

ACTOR = "rewards"
"""Who records what the rewards service decides (``CampaignBudgetExhausted``'s actor)."""
WELCOME_PERIOD = "welcome"
"""The ``period`` of a welcome bonus's key: one per user and campaign, ever."""
WELCOME_KEY = "user"
"""The ``grant_key`` of a welcome bonus."""

GrantKey = tuple[str, str, str, str]
"""``(campaign_id, user_id, period, grant_key)``: the primary key of ``reward_grants``."""
MonthKey = tuple[str, str, str]
"""``(campaign_id, user_id, period)``: the grants one user's month cap counts."""
SkipReason = Literal["already_granted", "exhausted", "wallet_currency"]
"""Why an event that earns by the rules gets nothing: granted before (redelivery, another
instance), the budget is spent, or the user's wallet holds another currency."""


@dataclass(frozen=True, slots=True)
class Captured:
    """A ``PaymentCaptured``, as the cashback sees it."""

    facts: PaymentFacts
    recorded_at: datetime
    """When the write store recorded the payment: where the grant's lag starts."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A ``UserRegistered``, as the welcome bonus sees it."""

    user_id: str
    registered_at: datetime
    """Its ``occurred_at``: the instant that decides the window."""
    recorded_at: datetime


Fact = Captured | Registered


def user_of(fact: Fact) -> str:
    return fact.facts.user_id if isinstance(fact, Captured) else fact.user_id


def key_of(state: CampaignState, fact: Fact) -> GrantKey | None:
    """The key a grant of ``fact`` by the campaign has, or ``None`` if the campaign's kind
    never grants for this kind of event."""
    rules = state.rules
    if isinstance(fact, Captured) and isinstance(rules, CashbackRules):
        month = month_of(fact.facts.captured_at, rules.zone)
        return (state.campaign_id, fact.facts.user_id, month, str(fact.facts.payment_id))
    if isinstance(fact, Registered) and isinstance(rules, WelcomeBonusRules):
        return (state.campaign_id, fact.user_id, WELCOME_PERIOD, WELCOME_KEY)
    return None


def keys_of(campaigns: Mapping[str, CampaignState], facts: Sequence[Fact]) -> set[GrantKey]:
    """Every key a grant of the batch could have: the rows to look for before deciding."""
    keys = set()
    for fact in facts:
        for state in campaigns.values():
            key = key_of(state, fact)
            if key is not None:
                keys.add(key)
    return keys


@dataclass(frozen=True, slots=True)
class Before:
    """What the batch's decision is made against, as its transaction read it."""

    campaigns: Mapping[str, CampaignState]
    existing: frozenset[GrantKey]
    """Keys already in ``reward_grants``."""
    granted: Mapping[str, Granted]
    """Per campaign (every campaign the batch may grant from)."""
    wallets: Mapping[str, Wallet]
    """Per user the batch touches."""
    month_sums: Mapping[MonthKey, int]
    """What each user was granted by each campaign in each month the batch touches."""


@dataclass(frozen=True, slots=True)
class Decided:
    """One grant, as the metrics and the tests see it."""

    campaign_id: str
    kind: RewardKind
    user_id: str
    amount: int
    requested: int
    lag_seconds: float
    """The grant's ``recorded_at`` minus the payment's (or registration's)."""


@dataclass
class BatchDecision:
    """What the batch's transaction appends, and what it counted."""

    wallet_events: list[RewardGranted] = field(default_factory=list)
    campaign_events: list[AnyCampaignEvent] = field(default_factory=list)
    grant_rows: list[dict[str, Any]] = field(default_factory=list)
    budget_rows: list[dict[str, Any]] = field(default_factory=list)
    grants: list[Decided] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    """By reason: a ``kessai.grants.Ineligible`` value or a ``SkipReason``."""
    remaining: dict[str, int] = field(default_factory=dict)
    """Per campaign whose total the batch read: what is left of its budget after the batch."""
    exhausted: frozenset[str] = frozenset()
    """The campaigns exhausted after the batch (recorded before it, or by it)."""


class _Running:
    """The state the decision advances grant by grant."""

    def __init__(self, before: Before, now: datetime, ids: Callable[[], uuid.UUID]) -> None:
        self.before = before
        self.campaigns = dict(before.campaigns)
        self.granted = {cid: g.amount for cid, g in before.granted.items()}
        self.wallets = dict(before.wallets)
        self.month_sums = dict(before.month_sums)
        self.seen: set[GrantKey] = set(before.existing)
        self.now = now
        self.ids = ids
        self.out = BatchDecision()
        self.count: Counter[str] = Counter()
        self.sums: Counter[str] = Counter()

    def granted_of(self, campaign_id: str) -> int:
        return self.granted.get(campaign_id, 0)

    def remaining(self, state: CampaignState) -> int:
        return state.rules.budget - self.granted_of(state.campaign_id)

    def exhaust_if_spent(self, state: CampaignState) -> CampaignState:
        event = decide_exhausted(
            state,
            granted=self.granted_of(state.campaign_id),
            now=self.now,
            actor=ACTOR,
            event_id=self.ids(),
        )
        if event is None:
            return state
        self.out.campaign_events.append(event)
        state = apply_campaign_event(state, event)
        self.campaigns[state.campaign_id] = state
        return state

    def grant(
        self,
        state: CampaignState,
        key: GrantKey,
        kind: RewardKind,
        requested: int,
        fact: Fact,
    ) -> None:
        """Grant ``requested`` (cut to the budget's remainder) under ``key``, unless the
        wallet holds another currency or nothing is left."""
        campaign_id, user_id, period, grant_key = key
        currency = state.rules.currency
        wallet = self.wallets[user_id]
        if wallet.currency is not None and wallet.currency != currency:
            self.out.skipped["wallet_currency"] += 1
            return
        amount, _cut = cut_to_budget(requested, self.remaining(state))
        if amount == 0:
            self.out.skipped["exhausted"] += 1
            self.exhaust_if_spent(state)
            return
        payment_id = fact.facts.payment_id if isinstance(fact, Captured) else None
        event = RewardGranted(
            event_id=self.ids(),
            user_id=user_id,
            version=wallet.version + 1,
            occurred_at=self.now,
            recorded_at=self.now,
            postings=transfer(campaign_account(campaign_id), user_account(user_id), amount),
            payload=RewardGrantedPayload(
                campaign_id=campaign_id,
                kind=kind,
                payment_id=payment_id,
                amount=amount,
                requested=requested,
                currency=currency,
                balance_after=wallet.balance + amount,
            ),
        )
        self.wallets[user_id] = apply_movement(wallet, movement_of(event))
        self.seen.add(key)
        if period != WELCOME_PERIOD:
            month = (campaign_id, user_id, period)
            self.month_sums[month] = self.month_sums.get(month, 0) + amount
        self.granted[campaign_id] = self.granted_of(campaign_id) + amount
        self.count[campaign_id] += 1
        self.sums[campaign_id] += amount
        self.out.wallet_events.append(event)
        self.out.grant_rows.append(
            {
                "campaign_id": campaign_id,
                "user_id": user_id,
                "period": period,
                "grant_key": grant_key,
                "amount": amount,
                "currency": currency,
                "event_id": event.event_id,
                "recorded_at": self.now,
            }
        )
        self.out.grants.append(
            Decided(
                campaign_id,
                kind,
                user_id,
                amount,
                requested,
                (self.now - fact.recorded_at).total_seconds(),
            )
        )
        self.exhaust_if_spent(state)

    def decide(self, fact: Fact, campaign_id: str) -> None:
        state = self.campaigns[campaign_id]
        key = key_of(state, fact)
        if key is None:
            return  # a cashback campaign and a registration, or the other way round
        if key in self.seen:
            self.out.skipped["already_granted"] += 1
            return
        kind: RewardKind
        if isinstance(fact, Captured):
            earned = cashback(state, fact.facts, granted_this_month=self.month_sums.get(key[:3], 0))
            if not isinstance(earned, Grant):
                self.out.skipped[earned.reason.value] += 1
                return
            requested, kind = earned.amount, "cashback"
        else:
            bonus = welcome_bonus(state, fact.registered_at)
            if bonus is None:
                reason = window_reason(state, fact.registered_at)
                self.out.skipped[(reason or Ineligible.NOT_WELCOME_BONUS).value] += 1
                return
            requested, kind = bonus, "welcome_bonus"
        if state.exhausted_at is not None:
            self.out.skipped["exhausted"] += 1
            return
        self.grant(state, key, kind, requested, fact)

    def finish(self) -> BatchDecision:
        for campaign_id, count in sorted(self.count.items()):
            before = self.before.granted.get(campaign_id, Granted(version=0, amount=0))
            self.out.budget_rows.append(
                {
                    "campaign_id": campaign_id,
                    "version": before.version + 1,
                    "amount": self.sums[campaign_id],
                    "grants": count,
                    "granted_after": self.granted[campaign_id],
                    "recorded_at": self.now,
                }
            )
        self.out.remaining = {
            campaign_id: max(0, self.campaigns[campaign_id].rules.budget - granted)
            for campaign_id, granted in self.granted.items()
            if campaign_id in self.campaigns
        }
        self.out.exhausted = frozenset(
            campaign_id
            for campaign_id, state in self.campaigns.items()
            if state.exhausted_at is not None
        )
        return self.out


def decide_batch(
    facts: Sequence[Fact],
    before: Before,
    *,
    now: datetime,
    ids: Callable[[], uuid.UUID] = new_id,
) -> BatchDecision:
    """The grants of ``facts`` (in order) against ``before``, recorded at ``now``: for each
    fact, each campaign in the order of their ids."""
    running = _Running(before, now, ids)
    order = sorted(before.campaigns)
    for fact in facts:
        for campaign_id in order:
            running.decide(fact, campaign_id)
    return running.finish()
