"""What a batch's decision (``rewards/decide.py``) takes and gives: the facts the rewards service
reads off the topic, what its transaction read before deciding (``Before``), and what it
decided (``BatchDecision``)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kessai.campaigns import AnyCampaignEvent, CampaignState
from kessai.debts import Debts
from kessai.events import RewardGranted, RewardKind, RewardTakenBack, TakeBackKind
from kessai.grants import GrantKey, MonthKey, PaymentFacts
from kessai.wallets import Wallet
from kessai.write_store import Granted

SkipReason = Literal[
    "already_granted", "exhausted", "wallet_currency", "already_taken_back", "nothing_due"
]
"""Why an event that earns by the rules gets nothing: granted before (redelivery, another
instance), the budget is spent, or the user's wallet holds another currency. Why a refund of a
rewarded payment takes nothing back: taken back before (redelivery), or its share of the
cashback rounds to nothing more than earlier refunds took."""


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


@dataclass(frozen=True, slots=True)
class Refunded:
    """A ``PaymentRefunded``, as the take-back sees it (the payment's user, amount and month
    come from its ``PaymentCaptured``, read from the write store: ``Before.payments``)."""

    payment_id: uuid.UUID
    refund_id: uuid.UUID
    refunded_total: int
    """What is refunded of the payment after this refund (``refunded_amount``)."""
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class Credited:
    """Money into a wallet (a top-up, a refund to the wallet, a grant): what pays off the
    user's debts to campaigns, if any."""

    user_id: str
    recorded_at: datetime


Fact = Captured | Registered | Refunded | Credited


@dataclass(frozen=True, slots=True)
class Before:
    """What the batch's decision is made against, as its transaction read it."""

    campaigns: Mapping[str, CampaignState]
    existing: frozenset[GrantKey]
    """Keys already in ``reward_grants``."""
    granted: Mapping[str, Granted]
    """Per campaign (every campaign the batch may grant from or take back to)."""
    wallets: Mapping[str, Wallet]
    """Per user the batch touches."""
    month_sums: Mapping[MonthKey, int]
    """What each user was granted by each campaign in each month the batch touches."""
    payments: Mapping[uuid.UUID, PaymentFacts] = field(default_factory=dict)
    """The captured facts of each payment the batch refunds."""
    refund_rows: Mapping[GrantKey, int] = field(default_factory=dict)
    """The ``reward_grants`` rows of the payments the batch refunds: each one's grant (key
    ``<payment id>``) and earlier take-backs (``<payment id>/<refund id>``, negative)."""
    debts: Mapping[str, Debts] = field(default_factory=dict)
    """Per user whose debts the batch may change (refunded, credited)."""


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


@dataclass(frozen=True, slots=True)
class TakenBack:
    """One take-back (at a refund) or one debt's payment (from a credit)."""

    campaign_id: str
    kind: TakeBackKind
    user_id: str
    payment_id: uuid.UUID
    refund_id: uuid.UUID
    due: int
    amount: int
    """What the wallet gave back (``RewardTakenBack.amount``; 0: the wallet was empty)."""
    owed: int
    """``due - amount``: what stays owed."""


@dataclass
class BatchDecision:
    """What the batch's transaction appends, and what it counted."""

    wallet_events: list[RewardGranted | RewardTakenBack] = field(default_factory=list)
    campaign_events: list[AnyCampaignEvent] = field(default_factory=list)
    grant_rows: list[dict[str, Any]] = field(default_factory=list)
    budget_rows: list[dict[str, Any]] = field(default_factory=list)
    debt_rows: list[dict[str, Any]] = field(default_factory=list)
    grants: list[Decided] = field(default_factory=list)
    taken_back: list[TakenBack] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    """By reason: a ``kessai.grants.Ineligible`` value or a ``SkipReason``."""
    remaining: dict[str, int] = field(default_factory=dict)
    """Per campaign whose total the batch read: what is left of its budget after the batch."""
    exhausted: frozenset[str] = frozenset()
    """The campaigns exhausted after the batch (recorded before it, or by it)."""
