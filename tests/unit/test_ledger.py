"""The fold: a payment's state from its events, and the invariants it refuses to break."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from command_service.handlers import WritePolicy
from command_service.routes.refunds import refund_command
from command_service.schemas import CreateRefund
from kessai.errors import ApiError
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
)
from kessai.ids import new_id
from kessai.ledger import InvariantViolation, PaymentState, apply, fold
from kessai.money import MAX_AMOUNT

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
PAYMENT_ID = uuid.UUID("0190c0de-1234-7abc-8def-0123456789ab")


def capture(amount: int = 1000, *, version: int = 1, currency: str = "JPY") -> PaymentCaptured:
    return PaymentCaptured(
        event_id=new_id(),
        payment_id=PAYMENT_ID,
        version=version,
        merchant_id="merchant-1",
        occurred_at=T0,
        recorded_at=T0,
        payload=PaymentCapturedPayload(
            amount=amount, currency=currency, user_id="user-1", method="card"
        ),
    )


def refund(
    amount: int,
    *,
    version: int,
    refunded_amount: int,
    currency: str = "JPY",
    minutes: int = 1,
    **envelope: Any,
) -> PaymentRefunded:
    fields: dict[str, Any] = {
        "event_id": new_id(),
        "payment_id": PAYMENT_ID,
        "version": version,
        "merchant_id": "merchant-1",
        "occurred_at": T0 + timedelta(minutes=minutes),
        "recorded_at": T0 + timedelta(minutes=minutes),
        "payload": PaymentRefundedPayload(
            refund_id=new_id(), amount=amount, currency=currency, refunded_amount=refunded_amount
        ),
    }
    fields.update(envelope)
    return PaymentRefunded(**fields)


def test_no_events_is_no_payment() -> None:
    assert fold([]) is None


def test_capture_then_refunds() -> None:
    captured = fold([capture(1000)])
    assert captured == PaymentState(
        payment_id=PAYMENT_ID,
        merchant_id="merchant-1",
        user_id="user-1",
        method="card",
        currency="JPY",
        captured_amount=1000,
        refunded_amount=0,
        version=1,
        created_at=T0,
        updated_at=T0,
    )
    assert captured.status == "captured"
    assert captured.refundable_amount == 1000

    history: list[PaymentCaptured | PaymentRefunded] = [
        capture(1000),
        refund(300, version=2, refunded_amount=300, minutes=1),
        refund(200, version=3, refunded_amount=500, minutes=2),
    ]
    partial = fold(history)
    assert partial is not None
    assert (partial.refunded_amount, partial.version, partial.status) == (
        500,
        3,
        "partially_refunded",
    )
    assert partial.refundable_amount == 500
    assert partial.created_at == T0
    assert partial.updated_at == T0 + timedelta(minutes=2)

    full = fold([*history, refund(500, version=4, refunded_amount=1000, minutes=3)])
    assert full is not None
    assert (full.refunded_amount, full.version, full.status) == (1000, 4, "refunded")
    assert full.refundable_amount == 0


def test_apply_does_not_change_the_state_it_is_given() -> None:
    before = fold([capture(1000)])
    after = apply(before, refund(1, version=2, refunded_amount=1))
    assert before is not None
    assert before.refunded_amount == 0
    assert after.refunded_amount == 1


@pytest.mark.parametrize(
    ("refunded_amount", "status"),
    [(0, "captured"), (1, "partially_refunded"), (99, "partially_refunded"), (100, "refunded")],
)
def test_status(refunded_amount: int, status: str) -> None:
    state = fold([capture(100)])
    assert state is not None
    assert replace(state, refunded_amount=refunded_amount).status == status


CAPTURED_1000 = [capture(1000)]

VIOLATIONS = [
    pytest.param([capture(1000), capture(1000, version=2)], id="second-capture"),
    pytest.param([capture(1000), capture(1000)], id="capture-twice-same-version"),
    pytest.param([capture(1000, version=2)], id="capture-not-version-1"),
    pytest.param([refund(1, version=1, refunded_amount=1)], id="refund-before-capture"),
    pytest.param([refund(1, version=2, refunded_amount=1)], id="refund-of-nothing"),
    pytest.param([*CAPTURED_1000, refund(1, version=3, refunded_amount=1)], id="version-gap"),
    pytest.param([*CAPTURED_1000, refund(1, version=1, refunded_amount=1)], id="version-repeat"),
    pytest.param(
        [
            *CAPTURED_1000,
            refund(1, version=2, refunded_amount=1),
            refund(1, version=2, refunded_amount=2),
        ],
        id="duplicate-refund-version",
    ),
    pytest.param(
        [*CAPTURED_1000, refund(1, version=2, refunded_amount=1, payment_id=uuid.uuid4())],
        id="other-payment",
    ),
    pytest.param(
        [*CAPTURED_1000, refund(1, version=2, refunded_amount=1, merchant_id="merchant-2")],
        id="other-merchant",
    ),
    pytest.param(
        [*CAPTURED_1000, refund(1, version=2, refunded_amount=1, currency="USD")],
        id="other-currency",
    ),
    pytest.param([*CAPTURED_1000, refund(1001, version=2, refunded_amount=1001)], id="over-refund"),
    pytest.param(
        [
            *CAPTURED_1000,
            refund(600, version=2, refunded_amount=600),
            refund(401, version=3, refunded_amount=1001),
        ],
        id="over-refund-in-total",
    ),
    pytest.param(
        [*CAPTURED_1000, refund(100, version=2, refunded_amount=200)],
        id="total-does-not-add-up",
    ),
    pytest.param(
        [
            *CAPTURED_1000,
            refund(100, version=2, refunded_amount=100),
            refund(100, version=3, refunded_amount=100),
        ],
        id="total-not-running",
    ),
]


@pytest.mark.parametrize("events", VIOLATIONS)
def test_invariant_violations(events: list[PaymentCaptured | PaymentRefunded]) -> None:
    valid_prefix = events[:-1]
    fold(valid_prefix)  # everything before the last event is fine...
    with pytest.raises(InvariantViolation):
        fold(events)  # ...the last one cannot follow it


# --- property: what the refund handler accepts never over-refunds ----------------------------

POLICY = WritePolicy(
    client_id="client-1",
    idempotency_key="key-1",
    retention=timedelta(hours=1),
    shards=8,
    max_attempts=5,
)


def _decide(state: PaymentState, amount: int) -> PaymentRefunded | None:
    """The refund handler's own decision on a folded state, with a fixed clock: the next
    event, or None (409)."""
    command = refund_command(
        policy=POLICY, payment_id=PAYMENT_ID, command=CreateRefund(amount=amount)
    )
    try:
        _status, _body, events = command.decide(
            state, None, clock=lambda: T0 + timedelta(minutes=1), ids=new_id
        )
    except ApiError as refused:
        if refused.code != "refund_exceeds_captured":
            raise
        return None
    (event,) = events
    assert isinstance(event, PaymentRefunded)
    return event


@settings(max_examples=200, deadline=None)
@given(
    captured_amount=st.integers(min_value=1, max_value=MAX_AMOUNT),
    requests=st.lists(st.integers(min_value=1, max_value=MAX_AMOUNT), max_size=30),
    small=st.booleans(),
)
def test_accepted_refunds_never_exceed_the_captured_amount(
    captured_amount: int, requests: list[int], small: bool
) -> None:
    if small:  # amounts near the captured amount, so that refunds run out
        requests = [1 + r % captured_amount for r in requests]
    events: list[PaymentCaptured | PaymentRefunded] = [capture(captured_amount)]
    state = fold(events)
    assert state is not None
    accepted = 0
    for amount in requests:
        event = _decide(state, amount)
        if event is None:
            # a refused amount really is more than is left, and the fold refuses it too
            total = state.refunded_amount + amount
            assert total > state.captured_amount
            if total > MAX_AMOUNT:  # such an event cannot even be built
                with pytest.raises(ValidationError):
                    refund(amount, version=state.version + 1, refunded_amount=total)
            else:
                with pytest.raises(InvariantViolation):
                    apply(state, refund(amount, version=state.version + 1, refunded_amount=total))
            continue
        events.append(event)
        accepted += amount
        state = apply(state, event)
        assert 0 < state.refunded_amount <= state.captured_amount

    final = fold(events)
    assert final == state
    assert final.refunded_amount == accepted <= captured_amount
    assert final.version == len(events)
    assert final.status == (
        "captured"
        if accepted == 0
        else "refunded"
        if accepted == captured_amount
        else "partially_refunded"
    )
