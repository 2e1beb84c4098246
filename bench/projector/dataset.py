"""The projector bench's events: planned as ``bench.reconciler`` plans them, built with the real
event classes, with what they must leave in the read side and the rows of each batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import orjson
from aiokafka.partitioner import DefaultPartitioner
from rich.progress import Progress

from bench.reconciler import (
    Planned,
    Shape,
    _at,
    _naive,
    assign_ids,
    merchant_zones,
    plan,
)
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    kafka_headers,
    kafka_key,
)
from kessai.ledger import PaymentState, apply

# -- the data set ------------------------------------------------------------------------------

Header = tuple[str, bytes]


class Effect(NamedTuple):
    """What one event does to the read side, as the projector computes it."""

    payment: tuple[Any, ...]
    """The ``payments`` row after this event (``PAYMENT_COLUMNS``)."""
    refund: tuple[Any, ...] | None
    """The ``refunds`` row this event adds (``REFUND_COLUMNS``), if it is a refund."""
    merchant: str
    currency: str
    day: date
    hour: datetime
    refunded: bool
    amount: int


@dataclass(slots=True)
class Expected:
    """What the read side must hold once every event is applied."""

    by_currency: dict[str, list[int]] = field(default_factory=dict)
    """currency -> [payments, captured sum, refunded sum]"""
    refunds: int = 0
    refunds_amount: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "payments_by_currency": {
                c: {"payments": n, "captured": cap, "refunded": ref}
                for c, (n, cap, ref) in sorted(self.by_currency.items())
            },
            "refunds": self.refunds,
            "refunds_amount": self.refunds_amount,
        }


@dataclass(slots=True)
class Prepared:
    """The events as records per partition, in offset order, and their effects alongside."""

    records: list[list[tuple[bytes, bytes, list[Header]]]]
    effects: list[list[Effect]]
    expected: Expected
    payments: int
    merchants: int


def topic_order(planned: Sequence[Planned]) -> list[tuple[float, int, int]]:
    """(time, payment index, version) of every event, in the order they happened: the order
    the relay publishes them (the outbox is in commit order)."""
    timeline = [(p.at, i, 1) for i, p in enumerate(planned)]
    timeline += [
        (when, i, v) for i, p in enumerate(planned) for v, (when, _, _) in enumerate(p.refunds, 2)
    ]
    timeline.sort()
    return timeline


def prepare(shape: Shape, partitions: int, default_zone: str, progress: Progress) -> Prepared:
    """Build every event with the event classes, its record as the relay publishes it, and its
    effect on the read side (state from ``kessai.ledger.apply``, buckets in the merchant's
    zone), as the projector computes them."""
    task = progress.add_task("planning", total=None)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    planned = plan(shape, end)
    assign_ids(planned)
    timeline = topic_order(planned)
    zones = {m: ZoneInfo(z) for m, z in merchant_zones(shape).items()}
    fallback = ZoneInfo(default_zone)
    every = list(range(partitions))
    partitioner = DefaultPartitioner()
    records: list[list[tuple[bytes, bytes, list[Header]]]] = [[] for _ in every]
    effects: list[list[Effect]] = [[] for _ in every]
    states: dict[int, PaymentState] = {}
    expected = Expected()
    progress.update(task, description="building events", total=len(timeline), completed=0)
    for n, (when, i, version) in enumerate(timeline):
        p = planned[i]
        event = _event(p, when, version)
        state = apply(states[i] if version > 1 else None, event)
        if isinstance(event, PaymentCaptured):
            sums = expected.by_currency.setdefault(p.currency, [0, 0, 0])
            sums[0] += 1
            sums[1] += p.amount
        else:
            expected.by_currency[p.currency][2] += event.payload.amount
            expected.refunds += 1
            expected.refunds_amount += event.payload.amount
        if version <= len(p.refunds):
            states[i] = state
        else:
            states.pop(i, None)
        key = kafka_key(event.payment_id)
        partition = partitioner(key, every, every)
        records[partition].append(
            (
                key,
                event_to_json(event),
                kafka_headers(event.event_type, event.schema_version, event.event_id),
            )
        )
        local = event.occurred_at.astimezone(zones.get(p.merchant, fallback))
        effects[partition].append(_effect(p, event, state, local))
        if n % 10_000 == 0:
            progress.update(task, completed=n)
    progress.remove_task(task)
    return Prepared(
        records=records,
        effects=effects,
        expected=expected,
        payments=len(planned),
        merchants=len({p.merchant for p in planned}),
    )


def _event(p: Planned, when: float, version: int) -> PaymentCaptured | PaymentRefunded:
    """The planned payment's event of ``version``: its capture, or one of its refunds."""
    if version == 1:
        return PaymentCaptured(
            event_id=p.ids[1],
            payment_id=p.ids[0],
            version=1,
            merchant_id=p.merchant,
            occurred_at=_at(when),
            recorded_at=_at(when),
            payload=PaymentCapturedPayload(
                amount=p.amount,
                currency=p.currency,
                user_id=p.user,
                method="card" if p.method == "card" else "balance",
                store_id=p.store_id,
                order_ref=p.order_ref,
                metadata=p.metadata,
            ),
        )
    refunds = len(p.refunds)
    _, amount, reason = p.refunds[version - 2]
    return PaymentRefunded(
        event_id=p.ids[version],
        payment_id=p.ids[0],
        version=version,
        merchant_id=p.merchant,
        occurred_at=_at(when),
        recorded_at=_at(when),
        payload=PaymentRefundedPayload(
            refund_id=p.ids[2 + refunds + version - 2],
            amount=amount,
            currency=p.currency,
            refunded_amount=sum(a for _, a, _ in p.refunds[: version - 1]),
            reason=reason,
        ),
    )


def _effect(
    p: Planned, event: PaymentCaptured | PaymentRefunded, state: PaymentState, local: datetime
) -> Effect:
    """What the event does to the read side: the payment's row after it, its refund row, and
    its share of the merchant's day and hour (``local``: when it happened, in its zone)."""
    payment_id = event.payment_id
    refund: tuple[Any, ...] | None = None
    if isinstance(event, PaymentRefunded):
        r = event.payload
        refund = (
            payment_id.bytes, event.version, r.refund_id.bytes, p.merchant, r.amount, p.currency,
            r.reason, _naive(event.occurred_at),
        )  # fmt: skip
    row = (
        payment_id.bytes, state.merchant_id, state.user_id, p.store_id, p.order_ref,
        state.method, state.currency, state.captured_amount, state.refunded_amount,
        state.status, state.version,
        orjson.dumps(p.metadata, option=orjson.OPT_SORT_KEYS).decode(),
        _naive(state.created_at), _naive(state.updated_at),
    )  # fmt: skip
    return Effect(
        payment=row,
        refund=refund,
        merchant=p.merchant,
        currency=p.currency,
        day=local.date(),
        hour=local.replace(minute=0, second=0, microsecond=0, tzinfo=None),
        refunded=refund is not None,
        amount=event.payload.amount,
    )
