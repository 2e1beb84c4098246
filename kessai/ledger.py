"""The fold: a payment's current state is its events applied in version order.

This is the ledger's single definition of a payment's state. The command side folds a
payment's events to validate a refund; the projector and the reconciler fold the same way,
so "the read side equals the fold of the write store" has one meaning everywhere. Likewise
``postings_of`` is the one definition of the postings of an event, stored with them or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from kessai.events import PaymentCaptured, PaymentRefunded
from kessai.postings import Posting, capture_postings, refund_postings

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


def postings_of(
    event: PaymentCaptured | PaymentRefunded, payment: PaymentState | None = None
) -> tuple[Posting, ...]:
    """The postings of ``event``: its own (schema version 2 on), or, for an event stored before
    events carried postings, those ``derived_postings`` gives (the upcaster)."""
    if event.postings is not None:
        return event.postings
    return derived_postings(event, payment)


def derived_postings(
    event: PaymentCaptured | PaymentRefunded, payment: PaymentState | None = None
) -> tuple[Posting, ...]:
    """The postings ``event`` makes by what it says: a capture's from its payload, a refund's
    from its ``payment``'s state before it (the payment's method and user say where the money
    goes back to). An event that carries postings must carry exactly these."""
    if isinstance(event, PaymentCaptured):
        p = event.payload
        return capture_postings(p.method, p.user_id, event.merchant_id, p.amount)
    if payment is None:
        raise ValueError(f"the postings of refund {event.payload.refund_id} need its payment")
    return refund_postings(payment.method, payment.user_id, event.merchant_id, event.payload.amount)
