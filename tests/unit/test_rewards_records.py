"""What the rewards service takes from the topic (``rewards.service.facts_of``): captured
payments, registrations, refunds and credits to wallets, in order; everything else skipped by
its header without decoding; a record of a kind it acts on that does not decode counted."""

from __future__ import annotations

import uuid

from aiokafka import ConsumerRecord

from kessai.events import PaymentCaptured, UserRegistered, kafka_headers, registration_to_json
from kessai.ids import new_id
from rewards.decide import Captured, Refunded, Registered
from rewards.service import facts_of
from tests.unit.test_projector_apply import T0, captured, record, refunded
from tests.unit.test_registrations import registered


def as_consumed(
    value: bytes, headers: list[tuple[str, bytes]], offset: int
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="t",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=headers,
    )


def of(event: PaymentCaptured | UserRegistered, offset: int) -> ConsumerRecord[bytes, bytes]:
    if isinstance(event, UserRegistered):
        value = registration_to_json(event)
    else:
        value = record(event).value or b""
    return as_consumed(
        value, kafka_headers(event.event_type, event.schema_version, event.event_id), offset
    )


def test_payments_registrations_and_refunds_are_taken_in_order_and_the_rest_skipped() -> None:
    pid = uuid.UUID(int=7)
    payment, joined = captured(pid, 2_000), registered("u9")
    refund = refunded(pid, 2, 100, 100)
    refund_record = record(refund)
    records = [
        of(joined, 0),
        as_consumed(refund_record.value or b"", list(refund_record.headers), 1),
        # Another kind's header: skipped without decoding, whatever its body.
        as_consumed(b"not json", kafka_headers("WalletDebited", 2, new_id()), 2),
        as_consumed(b"not json", kafka_headers("RewardTakenBack", 2, new_id()), 2),
        as_consumed(b"{}", kafka_headers("CampaignCreated", 2, new_id()), 3),
        of(payment, 4),
    ]
    facts, undecodable = facts_of(records)
    assert undecodable == 0
    assert len(facts) == 3
    assert facts[0] == Registered("u9", joined.occurred_at, joined.recorded_at)
    assert facts[1] == Refunded(pid, refund.payload.refund_id, 100, refund.recorded_at)
    cashback = facts[2]
    assert isinstance(cashback, Captured)
    assert cashback.recorded_at == T0
    assert (cashback.facts.payment_id, cashback.facts.user_id, cashback.facts.amount) == (
        pid,
        "u1",
        2_000,
    )
    assert (cashback.facts.method, cashback.facts.merchant_id, cashback.facts.captured_at) == (
        "balance",
        "m1",
        T0,
    )


def test_a_granting_record_that_does_not_decode_is_counted_and_skipped() -> None:
    headers = kafka_headers("PaymentCaptured", 2, new_id())
    facts, undecodable = facts_of(
        [as_consumed(b"{broken", headers, 0), of(captured(uuid.UUID(int=1)), 1)]
    )
    assert undecodable == 1
    assert len(facts) == 1
