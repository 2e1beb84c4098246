"""The event contract: every event type survives its JSON form; malformed events do not parse."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from kessai.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    kafka_headers,
    kafka_key,
    parse_event,
)
from kessai.ids import new_id
from kessai.money import MAX_AMOUNT

AT = datetime(2026, 11, 24, 9, 30, 15, 123456, tzinfo=UTC)
PAYMENT_ID = uuid.UUID("0190c0de-1234-7abc-8def-0123456789ab")


def captured(**overrides: Any) -> PaymentCaptured:
    fields: dict[str, Any] = {
        "event_id": new_id(),
        "payment_id": PAYMENT_ID,
        "version": 1,
        "merchant_id": "merchant-1",
        "occurred_at": AT,
        "recorded_at": AT + timedelta(milliseconds=3),
        "payload": PaymentCapturedPayload(
            amount=1000,
            currency="JPY",
            user_id="user-1",
            method="card",
            store_id="store-7",
            order_ref="order 42",
            metadata={"memo": "お釣りなし 🍣"},
            device_id="pos-1",
        ),
    }
    fields.update(overrides)
    return PaymentCaptured(**fields)


def refunded(**overrides: Any) -> PaymentRefunded:
    fields: dict[str, Any] = {
        "event_id": new_id(),
        "payment_id": PAYMENT_ID,
        "version": 2,
        "merchant_id": "merchant-1",
        "occurred_at": AT,
        "recorded_at": AT,
        "payload": PaymentRefundedPayload(
            refund_id=new_id(), amount=300, currency="JPY", refunded_amount=300, reason="damaged"
        ),
    }
    fields.update(overrides)
    return PaymentRefunded(**fields)


SAMPLES: dict[str, list[PaymentCaptured | PaymentRefunded]] = {
    "PaymentCaptured": [
        captured(),
        captured(
            payload=PaymentCapturedPayload(
                amount=MAX_AMOUNT, currency="KWD", user_id="u", method="balance"
            )
        ),
        captured(
            payload=PaymentCapturedPayload(
                amount=1200, currency="JPY", user_id="u", method="card", authorization_id="a_1"
            )
        ),
    ],
    "PaymentRefunded": [
        refunded(),
        refunded(
            payload=PaymentRefundedPayload(
                refund_id=new_id(), amount=1, currency="USD", refunded_amount=1
            )
        ),
    ],
}


def as_dict(event: PaymentCaptured | PaymentRefunded) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(event_to_json(event))
    return data


def test_every_event_type_has_samples() -> None:
    assert set(SAMPLES) == set(EVENT_TYPES)
    for event_type, samples in SAMPLES.items():
        assert {e.event_type for e in samples} == {event_type}


@pytest.mark.parametrize(
    "event", [e for samples in SAMPLES.values() for e in samples], ids=lambda e: e.event_type
)
def test_round_trip_through_json(event: PaymentCaptured | PaymentRefunded) -> None:
    raw = event_to_json(event)
    parsed = parse_event(raw)

    assert type(parsed) is type(event)
    assert parsed == event
    assert event_to_json(parsed) == raw  # the canonical form is stable
    assert parse_event(raw.decode()) == event


def test_json_form_carries_the_envelope() -> None:
    event = refunded()
    data = as_dict(event)
    assert data["event_type"] == "PaymentRefunded"
    # Built without postings, as events were stored before postings existed: version 1.
    assert data["schema_version"] == 1 < SCHEMA_VERSION
    assert data["payment_id"] == str(PAYMENT_ID)
    assert data["version"] == 2
    assert data["payload"]["refunded_amount"] == 300
    assert datetime.fromisoformat(data["occurred_at"].replace("Z", "+00:00")) == AT


def test_authorization_id_is_written_only_when_there_is_one() -> None:
    """Events without it (balance payments, card payments from before authorizations) keep
    their exact JSON form, so readers that predate the field still read them."""
    without = as_dict(captured())
    assert "authorization_id" not in without["payload"]
    assert parse_event(orjson.dumps(without)).payload.authorization_id is None
    authorized = captured(payload=captured().payload.model_copy(update={"authorization_id": "x"}))
    assert as_dict(authorized)["payload"]["authorization_id"] == "x"


def test_an_event_recorded_before_authorizations_reads_and_keeps_its_bytes() -> None:
    old = (
        b'{"event_id":"0190c0de-1234-7abc-8def-000000000001","schema_version":1,'
        b'"payment_id":"0190c0de-1234-7abc-8def-0123456789ab","version":1,'
        b'"merchant_id":"merchant-1","occurred_at":"2026-11-24T09:30:15.123456Z",'
        b'"recorded_at":"2026-11-24T09:30:15.123456Z","event_type":"PaymentCaptured",'
        b'"payload":{"amount":1000,"currency":"JPY","user_id":"user-1","method":"card",'
        b'"store_id":null,"order_ref":null,"metadata":{},"device_id":null}}'
    )
    event = parse_event(old)
    assert isinstance(event, PaymentCaptured)
    assert event.payload.authorization_id is None
    assert event_to_json(event) == old


@pytest.mark.parametrize("value", ["", "a b", "x" * 129, "caf\u00e9", 7])
def test_malformed_authorization_id_is_rejected(value: object) -> None:
    data = as_dict(captured())
    data["payload"]["authorization_id"] = value
    with pytest.raises(ValidationError):
        parse_event(orjson.dumps(data))


def test_other_timezones_parse_to_the_same_instant() -> None:
    data = as_dict(captured())
    data["occurred_at"] = "2026-11-24T18:30:15.123456+09:00"
    assert parse_event(orjson.dumps(data)).occurred_at == AT
    assert parse_event(orjson.dumps(data)).occurred_at.tzinfo is not None
    assert captured(occurred_at=AT.astimezone(timezone(timedelta(hours=9)))).occurred_at == AT


def test_newer_schema_version_still_parses() -> None:
    """``parse_event`` accepts any schema_version >= 1; refusing newer ones is the readers'
    decision, made on the value it keeps."""
    data = as_dict(captured())
    data["schema_version"] = SCHEMA_VERSION + 1
    assert parse_event(orjson.dumps(data)).schema_version == SCHEMA_VERSION + 1


def _mutated(event: PaymentCaptured | PaymentRefunded, path: tuple[str, ...], value: Any) -> bytes:
    data = as_dict(event)
    target = data
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return orjson.dumps(data)


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("event_type",), "PaymentVoided", id="unknown-event-type"),
        pytest.param(("event_type",), "paymentcaptured", id="event-type-case"),
        pytest.param(("event_type",), _DELETE, id="no-event-type"),
        pytest.param(("schema_version",), 0, id="schema-version-0"),
        pytest.param(("version",), 0, id="version-0"),
        pytest.param(("occurred_at",), "2026-11-24T09:30:15", id="naive-occurred-at"),
        pytest.param(("recorded_at",), "2026-11-24T09:30:15.5", id="naive-recorded-at"),
        pytest.param(("occurred_at",), "yesterday", id="not-a-time"),
        pytest.param(("extra",), "x", id="extra-envelope-field"),
        pytest.param(("payload", "extra"), "x", id="extra-payload-field"),
        pytest.param(("payload", "amount"), 0, id="amount-0"),
        pytest.param(("payload", "amount"), MAX_AMOUNT + 1, id="amount-over-max"),
        pytest.param(("payload", "amount"), "1000", id="amount-string"),
        pytest.param(("payload", "amount"), 1000.0, id="amount-float"),
        pytest.param(("payload", "currency"), "jpy", id="currency-lowercase"),
        pytest.param(("payload", "method"), "cash", id="method"),
        pytest.param(("payload", "user_id"), "user 1", id="user-id"),
        pytest.param(("merchant_id",), "", id="merchant-id-empty"),
        pytest.param(("payment_id",), "not-a-uuid", id="payment-id"),
        pytest.param(("payload",), _DELETE, id="no-payload"),
    ],
)
def test_malformed_captured_event_is_rejected(path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(ValidationError):
        parse_event(_mutated(captured(), path, value))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("payload", "refunded_amount"), 0, id="refunded-amount-0"),
        pytest.param(("payload", "refund_id"), _DELETE, id="no-refund-id"),
        pytest.param(("payload", "user_id"), "user-1", id="capture-field-in-refund"),
    ],
)
def test_malformed_refunded_event_is_rejected(path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(ValidationError):
        parse_event(_mutated(refunded(), path, value))


def test_payload_of_the_other_type_is_rejected() -> None:
    data = as_dict(refunded())
    data["payload"] = as_dict(captured())["payload"]
    with pytest.raises(ValidationError):
        parse_event(orjson.dumps(data))


def test_naive_datetime_is_rejected_when_building_too() -> None:
    with pytest.raises(ValidationError):
        captured(occurred_at=datetime(2026, 11, 24, 9, 30))  # noqa: DTZ001


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"PaymentCaptured"'])
def test_non_objects_are_rejected(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_event(raw)


def test_events_are_immutable() -> None:
    event = captured()
    with pytest.raises(ValidationError):
        event.version = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        event.payload.amount = 1  # type: ignore[misc]


def test_kafka_key_and_headers() -> None:
    event = refunded()
    assert kafka_key(PAYMENT_ID) == str(PAYMENT_ID).encode()
    assert kafka_headers(event.event_type, event.schema_version, event.event_id) == [
        ("event_type", b"PaymentRefunded"),
        ("schema_version", b"1"),
        ("event_id", str(event.event_id).encode()),
    ]
    replayed = dict(kafka_headers("PaymentCaptured", 1, event.event_id, replay=True))
    assert replayed["replay"] == b"1"
