"""``UserRegistered``: the event contract, its stream id, and the projector skipping it
(without I/O)."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from kessai.events import (
    REGISTRATION_NAMESPACE,
    UserRegistered,
    UserRegisteredPayload,
    kafka_headers,
    kafka_key,
    parse_any_event,
    registration_stream_id,
    registration_to_json,
    stream_of,
    wallet_stream_id,
)
from kessai.ids import new_id
from projector.apply import Record, Snapshot, apply_batch
from tests.unit.test_projector_apply import T0, captured, record, zone_of


def registered(user_id: str = "u1", **payload: str) -> UserRegistered:
    return UserRegistered(
        event_id=new_id(),
        user_id=user_id,
        occurred_at=T0,
        recorded_at=T0,
        payload=UserRegisteredPayload(**payload),  # type: ignore[arg-type]
    )


def registration_record(
    event: UserRegistered, offset: int = 0, *, key: bytes | None = None
) -> Record:
    return Record(
        topic="t",
        partition=0,
        offset=offset,
        key=kafka_key(stream_of(event)) if key is None else key,
        value=registration_to_json(event),
        headers=tuple(kafka_headers(event.event_type, event.schema_version, event.event_id)),
    )


def test_a_registration_round_trips_through_its_json_at_schema_version_2_version_1() -> None:
    event = registered(device_id="phone-7", referrer="u2")
    parsed = parse_any_event(registration_to_json(event))
    assert parsed == event
    assert (parsed.schema_version, parsed.version, parsed.event_type) == (2, 1, "UserRegistered")
    assert "postings" not in registration_to_json(event).decode()


def test_the_registration_stream_is_a_uuid3_never_a_payment_or_a_wallet_stream() -> None:
    stream = registration_stream_id("u1")
    assert stream == uuid.uuid3(REGISTRATION_NAMESPACE, "user:u1")
    assert stream.version == 3
    assert stream != wallet_stream_id("u1")
    assert wallet_stream_id("u1").version == 5
    assert new_id().version == 7
    assert stream_of(registered("u1")) == stream
    assert registration_stream_id("u2") != stream


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": 2}, "version"),
        ({"user_id": "u 1"}, "user_id"),
        ({"payload": {"referrer": "u1"}}, "not its own referrer"),
        ({"payload": {"device_id": "has space"}}, "device_id"),
        ({"payload": {"extra": "x"}}, "extra"),
    ],
)
def test_a_registration_that_breaks_the_contract_does_not_parse(
    change: dict[str, object], field: str
) -> None:
    raw = registered("u1").model_dump(mode="json") | change
    with pytest.raises(ValidationError, match=field):
        UserRegistered.model_validate(raw)


def test_the_projector_skips_a_registration_writing_nothing_but_counting_it() -> None:
    pid = new_id()
    records = [registration_record(registered("u1"), 0), record(captured(pid), 1)]
    changes = apply_batch(records, Snapshot(), zone_of)
    assert changes.skipped == 1
    assert changes.applied == 1
    assert set(changes.payments) == {pid}
    assert not changes.wallets
    assert not changes.movements
    assert not changes.parked
    assert not changes.dead_letters


def test_a_redelivered_registration_is_skipped_again_never_parked() -> None:
    event = registered("u1")
    records = [registration_record(event, 0), registration_record(event, 1)]
    changes = apply_batch(records, Snapshot(), zone_of)
    assert (changes.skipped, changes.applied, changes.duplicates) == (2, 0, 0)
    assert not changes.parked
    assert not changes.dead_letters


def test_a_registration_under_another_key_is_a_dead_letter() -> None:
    event = registered("u1")
    wrong = kafka_key(wallet_stream_id("u1"))
    changes = apply_batch([registration_record(event, key=wrong)], Snapshot(), zone_of)
    (letter,) = changes.dead_letters
    assert "registration stream" in letter.reason
    assert changes.skipped == 0


def test_a_valid_registration_supersedes_an_open_dead_letter_of_its_stream() -> None:
    stream = registration_stream_id("u1")
    snapshot = Snapshot(dead_lettered={stream: {1}})
    changes = apply_batch([registration_record(registered("u1"))], snapshot, zone_of)
    assert changes.resolved == {(stream, 1)}
    assert changes.skipped == 1
    assert not changes.dead_letters


def test_the_reconciler_tells_a_registration_stream_from_payments_and_wallets() -> None:
    from reconciler.wallets import is_registration_stream, is_wallet_stream

    stream = registration_stream_id("u1")
    assert is_registration_stream(stream)
    assert not is_wallet_stream(stream)
    assert not is_registration_stream(wallet_stream_id("u1"))
    assert not is_registration_stream(new_id())
    assert not is_registration_stream(None)
