"""The projector's decisions, without I/O: duplicates, gaps, dead letters, totals."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    kafka_headers,
)
from kessai.ids import new_id
from kessai.ledger import fold
from projector.apply import Changes, Record, Snapshot, apply_batch

TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 24, 16, 30, tzinfo=UTC)  # 2026-11-25 01:30 in Tokyo


def zone_of(_merchant: str) -> ZoneInfo:
    return TOKYO


def captured(pid: uuid.UUID, amount: int = 1000, *, at: datetime = T0) -> PaymentCaptured:
    return PaymentCaptured(
        event_id=new_id(),
        payment_id=pid,
        version=1,
        merchant_id="m1",
        occurred_at=at,
        recorded_at=at,
        payload=PaymentCapturedPayload(
            amount=amount, currency="JPY", user_id="u1", method="balance"
        ),
    )


def refunded(
    pid: uuid.UUID, version: int, amount: int, total: int, *, at: datetime = T0
) -> PaymentRefunded:
    return PaymentRefunded(
        event_id=new_id(),
        payment_id=pid,
        version=version,
        merchant_id="m1",
        occurred_at=at,
        recorded_at=at,
        payload=PaymentRefundedPayload(
            refund_id=new_id(), amount=amount, currency="JPY", refunded_amount=total
        ),
    )


def record(event: PaymentCaptured | PaymentRefunded, offset: int = 0) -> Record:
    return Record(
        topic="t",
        partition=0,
        offset=offset,
        key=str(event.payment_id).encode(),
        value=event_to_json(event),
        headers=tuple(kafka_headers(event.event_type, event.schema_version, event.event_id)),
    )


def run(
    events: list[PaymentCaptured | PaymentRefunded], snapshot: Snapshot | None = None
) -> Changes:
    return apply_batch(
        [record(e, i) for i, e in enumerate(events)], snapshot or Snapshot(), zone_of
    )


def test_capture_then_refunds_fold_into_one_row_and_local_day_totals() -> None:
    pid = new_id()
    changes = run([captured(pid), refunded(pid, 2, 300, 300), refunded(pid, 3, 700, 1000)])
    row = changes.payments[pid]
    assert (row.state.refunded_amount, row.state.version, row.state.status) == (
        1000,
        3,
        "refunded",
    )
    assert [r.amount for r in changes.refunds] == [300, 700]
    ((key, delta),) = changes.daily.items()
    assert key == ("m1", date(2026, 11, 25), "JPY")  # the Tokyo date, not the UTC one
    assert (delta.payments_count, delta.payments_amount) == (1, 1000)
    assert (delta.refunds_count, delta.refunds_amount) == (2, 1000)
    ((hour_key, _),) = changes.hourly.items()
    assert hour_key[1] == datetime(2026, 11, 25, 1, 0, tzinfo=TOKYO).replace(tzinfo=None)


def test_a_duplicate_changes_nothing() -> None:
    pid = new_id()
    capture = captured(pid)
    changes = run([capture, capture])
    assert changes.applied == 1
    assert changes.duplicates == 1
    assert changes.daily[("m1", date(2026, 11, 25), "JPY")].payments_count == 1


def test_version_two_before_one_is_parked_then_applied() -> None:
    pid = new_id()
    capture, refund = captured(pid), refunded(pid, 2, 100, 100)
    changes = run([refund, capture])
    assert changes.applied == 2
    assert changes.payments[pid].state.version == 2
    assert changes.parked == {}  # parked and drained inside the same batch


def test_a_gap_stays_parked_until_filled_in_a_later_batch() -> None:
    pid = new_id()
    capture = captured(pid)
    first = run([capture])
    later = refunded(pid, 3, 100, 200)
    second = run([later], Snapshot(payments=dict(first.payments)))
    assert second.applied == 0
    assert set(second.parked) == {(pid, 3)}
    snapshot = Snapshot(payments=dict(first.payments), parked=dict(second.parked))
    third = run([refunded(pid, 2, 100, 100)], snapshot)
    assert third.applied == 2
    assert third.unparked == {(pid, 3)}
    assert third.payments[pid].state.refunded_amount == 200


def test_poison_messages_are_dead_lettered_with_a_reason() -> None:
    good = captured(new_id())
    garbage = Record("t", 0, 1, key=b"not-a-uuid", value=b"{nope")
    newer = Record(
        "t", 0, 2, key=str(good.payment_id).encode(), value=b"{}",
        headers=(("schema_version", b"99"),),
    )  # fmt: skip
    changes = apply_batch([record(good), garbage, newer], Snapshot(), zone_of)
    assert changes.applied == 1
    reasons = [d.reason for d in changes.dead_letters]
    assert reasons[0].startswith("undecodable event")
    assert "newer" in reasons[1]


def test_an_invariant_breaking_event_blocks_only_its_payment() -> None:
    pid, other = new_id(), new_id()
    bad = refunded(pid, 2, 5000, 5000)  # more than the 1000 captured
    after = refunded(pid, 3, 10, 10)
    changes = run([captured(pid), captured(other), bad, after, refunded(other, 2, 10, 10)])
    assert [d.version for d in changes.dead_letters] == [2]
    assert "invariant" in changes.dead_letters[0].reason
    assert set(changes.parked) == {(pid, 3)}
    assert changes.parked[(pid, 3)].reason == "blocked"
    assert changes.payments[other].state.version == 2


def test_a_valid_event_of_the_dead_lettered_version_supersedes_it() -> None:
    pid = new_id()
    first = run([captured(pid), refunded(pid, 2, 5000, 5000), refunded(pid, 3, 10, 110)])
    snapshot = Snapshot(
        payments=dict(first.payments),
        parked=dict(first.parked),
        dead_lettered={pid: {2}},
    )
    fixed = run([refunded(pid, 2, 100, 100)], snapshot)
    assert fixed.resolved == {(pid, 2)}
    assert fixed.payments[pid].state.version == 3
    assert fixed.payments[pid].state.refunded_amount == 110


def history(pid: uuid.UUID, refunds: list[int]) -> list[PaymentCaptured | PaymentRefunded]:
    events: list[PaymentCaptured | PaymentRefunded] = [captured(pid, 10_000)]
    total = 0
    for i, amount in enumerate(refunds):
        total += amount
        events.append(refunded(pid, i + 2, amount, total, at=T0 + timedelta(hours=i)))
    return events


@settings(max_examples=150, deadline=None)
@given(
    refund_plans=st.lists(st.lists(st.integers(1, 1000), max_size=6), min_size=1, max_size=5),
    data=st.data(),
)
def test_any_delivery_order_with_duplicates_ends_in_the_fold(
    refund_plans: list[list[int]], data: st.DataObject
) -> None:
    """Shuffled, duplicated, split into batches: the read model equals the fold of the events."""
    all_events = [e for plan in refund_plans for e in history(new_id(), plan)]
    delivery = all_events + data.draw(st.lists(st.sampled_from(all_events), max_size=10))
    delivery = data.draw(st.permutations(delivery))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(delivery)), max_size=4)))
    snapshot = Snapshot()
    payments_total = refunds_total = 0
    for start, end in zip([0, *cuts], [*cuts, len(delivery)], strict=True):
        changes = apply_batch(
            [record(e, i) for i, e in enumerate(delivery[start:end])], snapshot, zone_of
        )
        assert changes.dead_letters == []
        snapshot.payments.update(changes.payments)
        for key in changes.unparked:
            snapshot.parked.pop(key, None)
        snapshot.parked.update(
            {k: v for k, v in changes.parked.items() if k not in changes.unparked}
        )
        payments_total += sum(d.payments_amount for d in changes.daily.values())
        refunds_total += sum(d.refunds_amount for d in changes.daily.values())
    assert snapshot.parked == {}
    by_payment: dict[uuid.UUID, list[PaymentCaptured | PaymentRefunded]] = {}
    for event in all_events:
        by_payment.setdefault(event.payment_id, []).append(event)
    for pid, events in by_payment.items():
        assert snapshot.payments[pid].state == fold(events)
    assert payments_total == sum(
        e.payload.amount for e in all_events if isinstance(e, PaymentCaptured)
    )
    assert refunds_total == sum(
        e.payload.amount for e in all_events if isinstance(e, PaymentRefunded)
    )
    assert orjson.loads(next(iter(snapshot.payments.values())).metadata) == {}
