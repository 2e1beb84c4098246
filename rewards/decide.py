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

A refund of a rewarded payment takes back, for each campaign that granted it, ``due =
take_back(granted, payment amount, refunded total, due before)`` (``kessai.grants``): the
wallet gives back ``min(balance, due)`` (a ``RewardTakenBack``, posting ``user:<id>`` ->
``campaign:<id>``, only when above zero), and what it cannot give is owed (``kessai.debts``).
The take-back's ``reward_grants`` row is keyed ``<payment id>/<refund id>`` (a redelivered
refund finds it and takes nothing twice) and holds ``-due``: the month's net grants lose the
whole due. The campaign's total loses only what came back, so it always equals the postings. A
credit to a wallet whose user owes (``Credited``), and every take-back before its own share,
pays the debts off first, oldest first (``RewardTakenBack`` of kind ``debt``).

What it decides is what the transaction appends: one ``RewardGranted`` per grant (the wallet's
next movement, posting ``campaign:<id>`` -> ``user:<id>``), one ``RewardTakenBack`` per
take-back or debt paid that moved money, one ``reward_grants`` row per grant and take-back
(its primary key is the grant's key: a second grant of one payment, or of one user's welcome
bonus, by one campaign is refused by the store, and so is a second take-back of one refund),
one ``campaign_budget`` row per campaign whose total moved (the total after the batch, at the
version after the one read), one ``reward_debts`` row per user whose debts changed, and the
exhaustions.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from kessai.campaigns import CampaignState, CashbackRules, WelcomeBonusRules, apply_campaign_event
from kessai.debts import Debt, Debts, debts_to_json
from kessai.events import (
    RewardGranted,
    RewardGrantedPayload,
    RewardKind,
    RewardTakenBack,
    RewardTakenBackPayload,
    TakeBackKind,
)
from kessai.grants import (
    WELCOME_PERIOD,
    Grant,
    GrantKey,
    Ineligible,
    MonthKey,
    PaymentFacts,
    cashback,
    cashback_key,
    cut_to_budget,
    decide_exhausted,
    take_back,
    take_back_key,
    welcome_bonus,
    welcome_key,
    window_reason,
)
from kessai.ids import new_id
from kessai.postings import campaign_account, transfer, user_account
from kessai.wallets import apply_movement, movement_of
from kessai.write_store import Granted
from rewards.batch import (
    BatchDecision,
    Before,
    Captured,
    Credited,
    Decided,
    Fact,
    Refunded,
    Registered,
    SkipReason,
    TakenBack,
)

__all__ = [
    "BatchDecision",
    "Before",
    "Captured",
    "Credited",
    "Decided",
    "Fact",
    "GrantKey",
    "MonthKey",
    "Refunded",
    "Registered",
    "SkipReason",
    "TakenBack",
    "decide_batch",
    "key_of",
    "keys_of",
    "refund_months",
]

ACTOR = "rewards"
"""Who records what the rewards service decides (``CampaignBudgetExhausted``'s actor)."""


def key_of(state: CampaignState, fact: Fact) -> GrantKey | None:
    """The key a grant of ``fact`` by the campaign has, or ``None`` if the campaign's kind
    never grants for this kind of event."""
    rules = state.rules
    if isinstance(fact, Captured) and isinstance(rules, CashbackRules):
        return cashback_key(state.campaign_id, rules.zone, fact.facts)
    if isinstance(fact, Registered) and isinstance(rules, WelcomeBonusRules):
        return welcome_key(state.campaign_id, fact.user_id)
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


def grant_key_of(state: CampaignState, payment: PaymentFacts) -> GrantKey | None:
    """The key of the cashback the campaign granted ``payment``, if it is a cashback."""
    return key_of(state, Captured(payment, recorded_at=payment.captured_at))


def refund_months(
    campaigns: Mapping[str, CampaignState], payments: Mapping[uuid.UUID, PaymentFacts]
) -> set[MonthKey]:
    """The ``(campaign, user, month)`` ranges where the grants and earlier take-backs of the
    refunded ``payments`` are: the rows to read before deciding their take-backs."""
    months = set()
    for payment in payments.values():
        for state in campaigns.values():
            key = grant_key_of(state, payment)
            if key is not None:
                months.add(key[:3])
    return months


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
        self.refund_rows = dict(before.refund_rows)
        self.seen.update(before.refund_rows)
        self.debts = dict(before.debts)
        self.debts_changed: set[str] = set()
        self.out = BatchDecision()
        self.count: Counter[str] = Counter()
        self.sums: Counter[str] = Counter()
        self.touched: set[str] = set()
        """The campaigns whose total the batch changes: each gets its next budget row."""

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
        self.move_budget(campaign_id, amount)
        self.count[campaign_id] += 1
        if isinstance(fact, Captured):
            self.refund_rows[key] = amount  # a refund later in the batch takes it back
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

    def move_budget(self, campaign_id: str, amount: int) -> None:
        """The campaign's total granted moves by ``amount`` (negative: money back)."""
        self.granted[campaign_id] = self.granted_of(campaign_id) + amount
        self.sums[campaign_id] += amount
        self.touched.add(campaign_id)

    def take_back_event(
        self, user_id: str, kind: TakeBackKind, debt: Debt, due: int, amount: int, currency: str
    ) -> RewardTakenBack:
        """``amount`` (> 0) of ``due`` back from the wallet to the debt's campaign: the wallet's
        next movement, appended, and the campaign's total lowered by it."""
        wallet = self.wallets[user_id]
        event = RewardTakenBack(
            event_id=self.ids(),
            user_id=user_id,
            version=wallet.version + 1,
            occurred_at=self.now,
            recorded_at=self.now,
            postings=transfer(user_account(user_id), campaign_account(debt.campaign_id), amount),
            payload=RewardTakenBackPayload(
                campaign_id=debt.campaign_id,
                kind=kind,
                payment_id=debt.payment_id,
                refund_id=debt.refund_id,
                due=due,
                amount=amount,
                owed=due - amount,
                currency=currency,
                balance_after=wallet.balance - amount,
            ),
        )
        self.wallets[user_id] = apply_movement(wallet, movement_of(event))
        self.out.wallet_events.append(event)
        self.move_budget(debt.campaign_id, -amount)
        return event

    def pay_off(self, user_id: str) -> None:
        """What the wallet holds pays off the user's debts, oldest first: a ``RewardTakenBack``
        of kind ``debt`` per debt it pays (in part or in full)."""
        debts = self.debts.get(user_id)
        if debts is None or not debts.items:
            return  # the transaction read no wallet for a user who owes nothing
        wallet = self.wallets[user_id]
        if wallet.balance == 0:
            return
        currency = debts.currency
        if currency is None or wallet.currency != currency:
            self.out.skipped["wallet_currency"] += 1
            return
        payments, left = debts.pay_off(wallet.balance)
        for paid in payments:
            debt, amount = paid.debt, paid.amount
            self.take_back_event(user_id, "debt", debt, debt.owed, amount, currency)
            self.out.taken_back.append(
                TakenBack(
                    debt.campaign_id,
                    "debt",
                    user_id,
                    debt.payment_id,
                    debt.refund_id,
                    debt.owed,
                    amount,
                    paid.owed_after,
                )
            )
        self.debts[user_id] = left
        self.debts_changed.add(user_id)

    def refund(self, fact: Refunded, campaign_id: str) -> None:
        """Take back the refund's share of the cashback the campaign granted its payment:
        what the wallet holds of it now (after paying older debts), the rest owed."""
        payment = self.before.payments.get(fact.payment_id)
        state = self.campaigns[campaign_id]
        key = None if payment is None else grant_key_of(state, payment)
        granted = None if key is None else self.refund_rows.get(key)
        if payment is None or key is None or granted is None:
            return  # not a cashback campaign, or it granted this payment nothing
        taken_key = take_back_key(key, fact.refund_id)
        if taken_key in self.seen:
            self.out.skipped["already_taken_back"] += 1
            return
        prefix = f"{key[3]}/"
        before = -sum(
            a for k, a in self.refund_rows.items() if k[:3] == key[:3] and k[3].startswith(prefix)
        )
        if granted * fact.refunded_total // payment.amount <= before:
            self.out.skipped["nothing_due"] += 1
            return  # rounds to nothing more (or a later refund already took its share)
        due = take_back(granted, payment.amount, fact.refunded_total, before)
        user_id, currency = payment.user_id, state.rules.currency
        self.pay_off(user_id)
        wallet = self.wallets[user_id]
        amount = min(wallet.balance, due)
        debt = Debt(campaign_id, payment.payment_id, fact.refund_id, due - amount)
        event_id = self.ids()
        if amount > 0:
            event_id = self.take_back_event(user_id, "refund", debt, due, amount, currency).event_id
        if debt.owed > 0:
            debts = self.debts.get(user_id) or Debts.none(user_id)
            self.debts[user_id] = debts.add(debt, currency)
            self.debts_changed.add(user_id)
        self.seen.add(taken_key)
        self.refund_rows[taken_key] = -due
        self.month_sums[key[:3]] = self.month_sums.get(key[:3], 0) - due
        self.out.grant_rows.append(
            {
                "campaign_id": campaign_id,
                "user_id": user_id,
                "period": key[2],
                "grant_key": taken_key[3],
                "amount": -due,
                "currency": currency,
                "event_id": event_id,
                "recorded_at": self.now,
            }
        )
        self.out.taken_back.append(
            TakenBack(
                campaign_id,
                "refund",
                user_id,
                payment.payment_id,
                fact.refund_id,
                due,
                amount,
                debt.owed,
            )
        )

    def decide(self, fact: Fact, campaign_id: str) -> None:
        if isinstance(fact, Refunded):
            self.refund(fact, campaign_id)
            return
        if isinstance(fact, Credited):
            return  # once per fact, not per campaign: ``decide_batch``
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
        for campaign_id in sorted(self.touched):
            before = self.before.granted.get(campaign_id, Granted(version=0, amount=0))
            self.out.budget_rows.append(
                {
                    "campaign_id": campaign_id,
                    "version": before.version + 1,
                    "amount": self.sums[campaign_id],
                    "grants": self.count[campaign_id],
                    "granted_after": self.granted[campaign_id],
                    "recorded_at": self.now,
                }
            )
        for user_id in sorted(self.debts_changed):
            debts = self.debts[user_id]
            self.out.debt_rows.append(
                {
                    "user_id": user_id,
                    "version": debts.version + 1,
                    "owed_after": debts.total,
                    "currency": debts.currency,
                    "body": debts_to_json(debts),
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
        if isinstance(fact, Credited):
            running.pay_off(fact.user_id)
            continue
        for campaign_id in order:
            running.decide(fact, campaign_id)
    return running.finish()
