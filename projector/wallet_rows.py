"""What a wallet event does to the read model's ``wallets`` and ``wallet_movements``, without I/O.

A wallet event is applied through the same rule the write side decides movements by
(``kessai.wallets.apply_movement``): the next version, the wallet's currency, and a
``balance_after`` equal to the balance before plus the movement, never below zero. An event that
breaks it raises ``InvariantViolation`` (the caller dead-letters it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from kessai.events import (
    AnyWalletEvent,
    RewardGranted,
    RewardTakenBack,
    TopUpReceived,
    WalletCredited,
    wallet_stream_id,
)
from kessai.wallets import Wallet, apply_movement, movement_of

WalletEvent = AnyWalletEvent


@dataclass(frozen=True, slots=True)
class WalletRow:
    """A wallet as the read model stores it: the fold of its movements so far."""

    wallet: Wallet
    stream_id: uuid.UUID
    """``wallet_stream_id(user_id)``: the wallet's Kafka key, by which a batch loads it."""
    updated_at: datetime
    """When its newest movement happened."""


@dataclass(frozen=True, slots=True)
class MovementRow:
    """One line of a user's statement."""

    user_id: str
    version: int
    event_id: uuid.UUID
    kind: str
    amount: int
    """Signed, in minor units: positive into the wallet, negative out of it."""
    currency: str
    balance_after: int
    payment_id: uuid.UUID | None
    refund_id: uuid.UUID | None
    top_up_id: uuid.UUID | None
    merchant_id: str | None
    source: str | None
    reference: str | None
    recorded_at: datetime
    campaign_id: str | None = None
    """The campaign a grant (``reward``) comes from, or a take-back (``reward_takeback``) goes
    back to."""


def apply_wallet_event(row: WalletRow | None, event: WalletEvent) -> tuple[WalletRow, MovementRow]:
    """The wallet after ``event``, and the statement line it adds (``InvariantViolation`` if
    the event cannot follow the wallet as it stands)."""
    wallet = row.wallet if row is not None else Wallet.empty(event.user_id)
    movement = movement_of(event)
    after = apply_movement(wallet, movement)
    payment_id = refund_id = top_up_id = None
    merchant_id = source = reference = campaign_id = None
    if isinstance(event, TopUpReceived):
        top_up = event.payload
        top_up_id, source, reference = top_up.top_up_id, top_up.source, top_up.reference
    elif isinstance(event, RewardGranted):
        payment_id, campaign_id = event.payload.payment_id, event.payload.campaign_id
    elif isinstance(event, RewardTakenBack):
        taken = event.payload
        payment_id, refund_id, campaign_id = taken.payment_id, taken.refund_id, taken.campaign_id
    else:
        payment_id, merchant_id = event.payload.payment_id, event.payload.merchant_id
        if isinstance(event, WalletCredited):
            refund_id = event.payload.refund_id
    new_row = WalletRow(
        wallet=after,
        stream_id=row.stream_id if row is not None else wallet_stream_id(event.user_id),
        updated_at=event.occurred_at,
    )
    return new_row, MovementRow(
        user_id=event.user_id,
        version=event.version,
        event_id=event.event_id,
        kind=movement.kind,
        amount=movement.amount,
        currency=movement.currency,
        balance_after=movement.balance_after,
        payment_id=payment_id,
        refund_id=refund_id,
        top_up_id=top_up_id,
        merchant_id=merchant_id,
        source=source,
        reference=reference,
        recorded_at=event.recorded_at,
        campaign_id=campaign_id,
    )
