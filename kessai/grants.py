"""What a campaign grants: the cashback of one captured payment, the welcome bonus of one
registration, and what a refund takes back. Pure arithmetic on integers, without I/O.

The cashback of a payment of ``amount`` is ``floor(amount * rate_bp / 10000)``, then at most
``cap_per_payment``, then at most what is left of the user's ``cap_per_user_month`` in the
payment's calendar month of the campaign's time zone (``month_of``). Never rounded up: a grant
never exceeds the rate, and a campaign never gives a fraction of a yen it does not have.

The budget is not applied here: whoever holds the budget's remainder cuts the last grant to
it (``cut_to_budget``) and records the exhaustion (``decide_exhausted``).

A refund takes back the share of the grant the refunded amount is of the payment, rounded so
that the take-backs of any sequence of partial refunds add up to ``floor(granted *
refunded_total / payment_amount)``: each take-back is that figure after the refund minus the
one before it. A full refund takes back the whole grant.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from kessai.campaigns import (
    CampaignBudgetExhausted,
    CampaignBudgetExhaustedPayload,
    CampaignState,
    CashbackRules,
    WelcomeBonusRules,
    envelope,
)
from kessai.events import PaymentCaptured

BASIS_POINTS = 10_000


class Ineligible(enum.StrEnum):
    """Why a payment (or registration) earns nothing from a campaign; the value is what logs
    and metrics carry."""

    NOT_CASHBACK = "not_cashback"
    NOT_WELCOME_BONUS = "not_welcome_bonus"
    NOT_STARTED = "not_started"
    ENDED = "ended"
    STOPPED = "stopped"
    CURRENCY = "currency"
    METHOD = "method"
    MERCHANT = "merchant"
    BELOW_MINIMUM = "below_minimum"
    MONTH_CAP_REACHED = "month_cap_reached"
    ROUNDS_TO_ZERO = "rounds_to_zero"


@dataclass(frozen=True, slots=True)
class PaymentFacts:
    """What the cashback of a payment depends on: its captured event's facts."""

    payment_id: uuid.UUID
    user_id: str
    merchant_id: str
    method: str
    amount: int
    currency: str
    captured_at: datetime
    """The payment's ``occurred_at``: the instant that decides the window and the month."""


def payment_facts(event: PaymentCaptured) -> PaymentFacts:
    """What the cashback of the payment ``event`` captured depends on."""
    p = event.payload
    return PaymentFacts(
        payment_id=event.payment_id,
        user_id=p.user_id,
        merchant_id=event.merchant_id,
        method=p.method,
        amount=p.amount,
        currency=p.currency,
        captured_at=event.occurred_at,
    )


GrantKey = tuple[str, str, str, str]
"""``(campaign_id, user_id, period, grant_key)``: the primary key of the write store's
``reward_grants``, which grants a payment (or a registration) at most once per campaign."""
MonthKey = tuple[str, str, str]
"""``(campaign_id, user_id, period)``: one user's grants of one month (or welcome bonus) by one
campaign, a range of ``reward_grants``' primary key."""
WELCOME_PERIOD = "welcome"
"""The ``period`` of a welcome bonus's key: one per user and campaign, ever."""
WELCOME_KEY = "user"
"""The ``grant_key`` of a welcome bonus."""


def cashback_key(campaign_id: str, zone: ZoneInfo, payment: PaymentFacts) -> GrantKey:
    """The key of a payment's cashback: its month in the campaign's time zone (a payment fixes
    its user and its month, so the key is unique per (campaign, payment), and a user's grants
    of one month are one range of keys: what the month cap reads)."""
    month = month_of(payment.captured_at, zone)
    return (campaign_id, payment.user_id, month, str(payment.payment_id))


def welcome_key(campaign_id: str, user_id: str) -> GrantKey:
    return (campaign_id, user_id, WELCOME_PERIOD, WELCOME_KEY)


def take_back_key(grant: GrantKey, refund_id: uuid.UUID) -> GrantKey:
    """The key of what a refund takes back of the cashback keyed ``grant``: in the grant's
    range, ``<payment id>/<refund id>``."""
    return (*grant[:3], f"{grant[3]}/{refund_id}")


def is_take_back(grant_key: str) -> bool:
    """Whether a row's ``grant_key`` is a take-back's (``take_back_key``)."""
    return "/" in grant_key


@dataclass(frozen=True, slots=True)
class Grant:
    """The cashback one payment earns from one campaign, before the budget."""

    campaign_id: str
    payment_id: uuid.UUID
    user_id: str
    amount: int
    """> 0, in the campaign's (and the payment's) currency."""
    currency: str
    month: str
    """``YYYY-MM`` in the campaign's time zone: which month's per-user cap it counts against."""
    uncapped: int
    """``floor(amount * rate_bp / 10000)``: what the rate alone gives."""
    capped_by: Literal["payment", "user_month"] | None
    """Which cap made ``amount`` less than ``uncapped``, if any."""


@dataclass(frozen=True, slots=True)
class NoGrant:
    """A payment that earns nothing from a campaign, and why."""

    campaign_id: str
    payment_id: uuid.UUID
    reason: Ineligible


def month_of(instant: datetime, zone: ZoneInfo) -> str:
    """The calendar month (``YYYY-MM``) ``instant`` (aware) falls in, in ``zone``."""
    if instant.tzinfo is None:
        raise ValueError("month_of needs an aware datetime")
    return instant.astimezone(zone).strftime("%Y-%m")


def window_reason(state: CampaignState, at: datetime) -> Ineligible | None:
    """Why nothing happening at ``at`` earns from the campaign (``None``: it may). Earning
    runs over ``[starts_at, ends_at)``, until a stop. An exhaustion is not a reason here: the
    budget's holder knows what is left (``cut_to_budget``)."""
    if state.stopped_at is not None and at >= state.stopped_at:
        return Ineligible.STOPPED
    if at < state.rules.starts_at:
        return Ineligible.NOT_STARTED
    if at >= state.rules.ends_at:
        return Ineligible.ENDED
    return None


def eligibility(state: CampaignState, payment: PaymentFacts) -> Ineligible | None:
    """Why ``payment`` earns no cashback from the campaign whatever the caps (``None``: it is
    eligible)."""
    rules = state.rules
    if not isinstance(rules, CashbackRules):
        return Ineligible.NOT_CASHBACK
    if (reason := window_reason(state, payment.captured_at)) is not None:
        return reason
    if payment.currency != rules.currency:
        return Ineligible.CURRENCY
    if payment.method not in rules.methods:
        return Ineligible.METHOD
    if rules.merchants is not None and payment.merchant_id not in rules.merchants:
        return Ineligible.MERCHANT
    if payment.amount < rules.min_payment_amount:
        return Ineligible.BELOW_MINIMUM
    return None


def cashback(
    state: CampaignState, payment: PaymentFacts, *, granted_this_month: int
) -> Grant | NoGrant:
    """The cashback ``payment`` earns from the campaign, given what the user was already
    granted by it in the payment's month (``month_of(payment.captured_at, rules.zone)``, net
    of take-backs); ``NoGrant`` with the reason when it earns nothing."""
    if granted_this_month < 0:
        raise ValueError(f"granted_this_month is never negative, not {granted_this_month}")
    reason = eligibility(state, payment)
    if reason is not None:
        return NoGrant(state.campaign_id, payment.payment_id, reason)
    rules = state.rules
    assert isinstance(rules, CashbackRules)  # eligibility said so
    uncapped = payment.amount * rules.rate_bp // BASIS_POINTS
    month_left = max(0, rules.cap_per_user_month - granted_this_month)
    amount = min(uncapped, rules.cap_per_payment, month_left)
    if amount == 0:
        reason = Ineligible.MONTH_CAP_REACHED if month_left == 0 else Ineligible.ROUNDS_TO_ZERO
        return NoGrant(state.campaign_id, payment.payment_id, reason)
    capped_by: Literal["payment", "user_month"] | None = None
    if amount < uncapped:
        capped_by = "user_month" if amount == month_left < rules.cap_per_payment else "payment"
    return Grant(
        campaign_id=state.campaign_id,
        payment_id=payment.payment_id,
        user_id=payment.user_id,
        amount=amount,
        currency=rules.currency,
        month=month_of(payment.captured_at, rules.zone),
        uncapped=uncapped,
        capped_by=capped_by,
    )


def cut_to_budget(amount: int, remaining: int) -> tuple[int, bool]:
    """What of a grant of ``amount`` the budget's ``remaining`` covers, and whether it was cut
    (``(0, True)`` once nothing is left)."""
    if amount <= 0:
        raise ValueError(f"a grant is positive, not {amount}")
    granted = min(amount, max(remaining, 0))
    return granted, granted < amount


def decide_exhausted(
    state: CampaignState,
    *,
    granted: int,
    now: datetime,
    actor: str,
    event_id: uuid.UUID | None = None,
) -> CampaignBudgetExhausted | None:
    """The exhaustion to record once ``granted`` reaches the budget; ``None`` while some is
    left, or when it is already recorded."""
    if state.exhausted_at is not None or granted < state.rules.budget:
        return None
    at = envelope(state.campaign_id, state.version + 1, now=now, actor=actor, event_id=event_id)
    payload = CampaignBudgetExhaustedPayload(granted=granted, budget=state.rules.budget)
    return CampaignBudgetExhausted(**at, payload=payload)


def take_back(
    granted: int, payment_amount: int, refunded_total_after: int, taken_back_before: int
) -> int:
    """What a refund takes back of a payment's grant: ``floor(granted * refunded_total_after /
    payment_amount)`` minus what earlier refunds took back. So the take-backs of any sequence
    of refunds add up to the floor of the proportion, and a full refund
    (``refunded_total_after == payment_amount``) leaves nothing of the grant."""
    if granted < 0 or payment_amount <= 0:
        raise ValueError(f"a grant of {granted} on a payment of {payment_amount}")
    if not 0 <= refunded_total_after <= payment_amount:
        raise ValueError(f"{refunded_total_after} refunded of a payment of {payment_amount}")
    due = granted * refunded_total_after // payment_amount
    if not 0 <= taken_back_before <= due:
        raise ValueError(f"{taken_back_before} taken back before, more than the {due} now due")
    return due - taken_back_before


def welcome_bonus(state: CampaignState, registered_at: datetime) -> int | None:
    """The bonus of a user registered at ``registered_at``: the campaign's amount while it
    runs, ``None`` outside its window, after a stop, or from a cashback campaign."""
    if not isinstance(state.rules, WelcomeBonusRules):
        return None
    if window_reason(state, registered_at) is not None:
        return None
    return state.rules.amount
