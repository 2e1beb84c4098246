"""The pure comparison: a payment's read row against the fold of its write-store events.

No I/O here: the loaders (``reconciler.loaders``) bring both sides, the fingerprints
(``reconciler.fingerprints``) say which chunks need this exact comparison, and only this
comparison produces payment findings, so what is reported and repaired does not depend on the
first pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kessai.events import PaymentCaptured, PaymentRefunded
from kessai.ids import bound_at, bound_at_ms, time_of
from kessai.ledger import InvariantViolation, PaymentState, fold
from reconciler.records import Finding

__all__ = [
    "Event",
    "ReadPayment",
    "bound_at",
    "bound_at_ms",
    "compare",
    "compare_loaded",
    "time_of",
]

Event = PaymentCaptured | PaymentRefunded


@dataclass(frozen=True, slots=True)
class ReadPayment:
    merchant_id: str
    captured_amount: int
    refunded_amount: int
    version: int
    status: str
    refunds: tuple[tuple[int, int], ...]
    """(version, amount) of the payment's refund rows."""


# -- comparing ---------------------------------------------------------------------------------


def _shape(state: PaymentState) -> dict[str, object]:
    return {
        "captured_amount": state.captured_amount,
        "refunded_amount": state.refunded_amount,
        "version": state.version,
        "status": state.status,
    }


def _read_shape(row: ReadPayment) -> dict[str, object]:
    return {
        "captured_amount": row.captured_amount,
        "refunded_amount": row.refunded_amount,
        "version": row.version,
        "status": row.status,
    }


def _refunds_of(events: Iterable[Event]) -> tuple[tuple[int, int], ...]:
    return tuple((e.version, e.payload.amount) for e in events if isinstance(e, PaymentRefunded))


def compare(
    payment_id: uuid.UUID, events: Sequence[Event], row: ReadPayment | None
) -> Finding | None:
    """A finding if the read side does not equal the fold of ``events``.

    ``details["reset"]`` says how it is repaired: a row that is only behind (it equals the fold
    of a prefix of the events) is brought forward by re-publishing; a row that is wrong at its
    own version must first be removed, or the projector would skip the re-published events as
    duplicates.
    """
    try:
        state = fold(events)
    except InvariantViolation as exc:
        return Finding(
            kind="invalid_write_history",
            payment_id=payment_id,
            details={"error": str(exc)},
        )
    if state is None:
        return None
    if row is None:
        return Finding(
            kind="missing",
            payment_id=payment_id,
            merchant_id=state.merchant_id,
            details={"expected": _shape(state), "reset": False},
        )
    expected = (_shape(state), _refunds_of(events))
    if (_read_shape(row), row.refunds) == expected:
        return None
    behind = False
    if 1 <= row.version < state.version:
        prefix = events[: row.version]
        prefix_state = fold(prefix)
        behind = prefix_state is not None and (_read_shape(row), row.refunds) == (
            _shape(prefix_state),
            _refunds_of(prefix),
        )
    return Finding(
        kind="mismatch",
        payment_id=payment_id,
        merchant_id=state.merchant_id,
        details={
            "expected": _shape(state),
            "actual": _read_shape(row),
            "expected_refunds": len(expected[1]),
            "actual_refunds": len(row.refunds),
            "reset": not behind,
        },
    )


def compare_loaded(
    chunk: Sequence[uuid.UUID],
    events: Mapping[uuid.UUID, Sequence[Event]],
    rows: Mapping[uuid.UUID, ReadPayment],
) -> dict[uuid.UUID, Finding]:
    """Payment by payment: the fold of each payment's events against its read rows."""
    found: dict[uuid.UUID, Finding] = {}
    for pid in chunk:
        finding = compare(pid, events.get(pid, []), rows.get(pid))
        if finding is not None:
            found[pid] = finding
    return found
