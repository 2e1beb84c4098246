"""The fold: a payment's current state is its events applied in version order.

This is the ledger's single definition of a payment's state. The command side folds a
payment's events to validate a refund; the projector and the reconciler fold the same way,
so "the read side equals the fold of the write store" has one meaning everywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from kessai.events import PaymentCaptured, PaymentRefunded

PaymentStatus = Literal["captured", "partially_refunded", "refunded"]


class InvariantViolation(ValueError):
    """An event that cannot follow the state it is applied to (a ledger bug or corruption)."""


@dataclass(frozen=True, slots=True)
class PaymentState:
    payment_id: uuid.UUID
    merchant_id: str
    user_id: str
    method: str
    currency: str
    captured_amount: int
    refunded_amount: int
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def refundable_amount(self) -> int:
        return self.captured_amount - self.refunded_amount

    @property
    def status(self) -> PaymentStatus:
        if self.refunded_amount == 0:
            return "captured"
        if self.refunded_amount < self.captured_amount:
            return "partially_refunded"
        return "refunded"


def apply(state: PaymentState | None, event: PaymentCaptured | PaymentRefunded) -> PaymentState:
    """Apply one event; raise ``InvariantViolation`` if it cannot follow ``state``."""
    if isinstance(event, PaymentCaptured):
        if state is not None or event.version != 1:
            raise InvariantViolation(
                f"PaymentCaptured must be version 1 of a new payment, got {event.version}"
            )
        p = event.payload
        return PaymentState(
            payment_id=event.payment_id,
            merchant_id=event.merchant_id,
            user_id=p.user_id,
            method=p.method,
            currency=p.currency,
            captured_amount=p.amount,
            refunded_amount=0,
            version=1,
            created_at=event.occurred_at,
            updated_at=event.occurred_at,
        )
    if state is None:
        raise InvariantViolation("PaymentRefunded before PaymentCaptured")
    if event.version != state.version + 1:
        raise InvariantViolation(f"version {event.version} does not follow {state.version}")
    if event.payment_id != state.payment_id or event.merchant_id != state.merchant_id:
        raise InvariantViolation("event belongs to another payment or merchant")
    r = event.payload
    if r.currency != state.currency:
        raise InvariantViolation(f"refund in {r.currency} of a {state.currency} payment")
    refunded = state.refunded_amount + r.amount
    if refunded > state.captured_amount or refunded != r.refunded_amount:
        raise InvariantViolation(
            f"refund of {r.amount} makes {refunded} refunded "
            f"(event says {r.refunded_amount}) of {state.captured_amount} captured"
        )
    return replace(
        state, refunded_amount=refunded, version=event.version, updated_at=event.occurred_at
    )


def fold(events: Iterable[PaymentCaptured | PaymentRefunded]) -> PaymentState | None:
    """Fold events (in version order) into the payment's state; ``None`` for no events."""
    state: PaymentState | None = None
    for event in events:
        state = apply(state, event)
    return state
