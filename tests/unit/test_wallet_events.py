"""The wallet streams' event contract (kessai/events.py): what a top-up, a balance payment and
its refund record in a wallet's stream, what each may post, and their fold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from kessai.events import (
    TopUpReceived,
    TopUpReceivedPayload,
    WalletCredited,
    WalletCreditedPayload,
    WalletDebited,
    WalletDebitedPayload,
    parse_wallet_event,
    wallet_event_to_json,
    wallet_stream_id,
)
from kessai.ids import new_id
from kessai.postings import capture_postings, transfer
from kessai.wallets import Wallet, fold_wallet, movement_of

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
PAYMENT_ID = uuid.UUID("0190c0de-1234-7abc-8def-0123456789ab")


def envelope(version: int, **more: Any) -> dict[str, Any]:
    return {
        "event_id": new_id(),
        "user_id": "u1",
        "version": version,
        "occurred_at": T0,
        "recorded_at": T0,
        **more,
    }


def topped_up(amount: int = 10_000, balance_after: int = 10_000, **more: Any) -> TopUpReceived:
    fields = envelope(1, postings=transfer("world:topup:bank", "user:u1", amount))
    fields.update(more)
    return TopUpReceived(
        **fields,
        payload=TopUpReceivedPayload(
            top_up_id=new_id(),
            amount=amount,
            currency="JPY",
            source="bank",
            balance_after=balance_after,
        ),
    )


def debited(amount: int, balance_after: int, version: int = 2, **more: Any) -> WalletDebited:
    return WalletDebited(
        **envelope(version, **more),
        payload=WalletDebitedPayload(
            payment_id=PAYMENT_ID,
            merchant_id="shop-1",
            amount=amount,
            currency="JPY",
            balance_after=balance_after,
        ),
    )


def credited(amount: int, balance_after: int, version: int = 3) -> WalletCredited:
    return WalletCredited(
        **envelope(version),
        payload=WalletCreditedPayload(
            payment_id=PAYMENT_ID,
            refund_id=new_id(),
            merchant_id="shop-1",
            amount=amount,
            currency="JPY",
            balance_after=balance_after,
        ),
    )


def test_each_wallet_event_survives_its_json_form() -> None:
    for event in (topped_up(), debited(2_500, 7_500), credited(500, 8_000)):
        raw = wallet_event_to_json(event)
        assert parse_wallet_event(raw) == event
        assert event.schema_version == 2


def test_the_stream_folds_to_the_wallet() -> None:
    stream: list[TopUpReceived | WalletDebited | WalletCredited] = [
        topped_up(),
        debited(2_500, 7_500),
        credited(500, 8_000),
    ]
    wallet = fold_wallet("u1", [movement_of(e) for e in stream])
    assert wallet == Wallet(user_id="u1", currency="JPY", balance=8_000, version=3)


def test_a_top_up_posts_from_its_source_to_the_wallet_and_nowhere_else() -> None:
    with pytest.raises(ValidationError, match="a top-up posts"):
        topped_up(postings=transfer("world:topup:card", "user:u1", 10_000))
    with pytest.raises(ValidationError, match="a top-up posts"):
        topped_up(postings=transfer("world:topup:bank", "user:u2", 10_000))
    with pytest.raises(ValidationError):
        topped_up(postings=None)


def test_the_wallet_side_of_a_payment_posts_nothing_itself() -> None:
    """The payment's event carries the postings; the wallet's copy would count them twice."""
    with pytest.raises(ValidationError, match="carries no postings"):
        debited(2_500, 7_500, postings=capture_postings("balance", "u1", "shop-1", 2_500))


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("balance_after", -1),
        ("amount", 0),
        ("amount", 1.5),
        ("source", "Bank"),
        ("source", "bank transfer"),
        ("currency", "jpy"),
        ("reference", "line\nbreak"),
    ],
)
def test_a_top_up_that_cannot_be_is_refused(change: str, value: object) -> None:
    data = topped_up().model_dump(mode="json")
    data["payload"][change] = value
    with pytest.raises(ValidationError):
        TopUpReceived.model_validate(data)


def test_a_wallets_stream_id_is_its_own_and_always_the_same() -> None:
    assert wallet_stream_id("u1") == wallet_stream_id("u1")
    assert wallet_stream_id("u1") != wallet_stream_id("u2")
    assert wallet_stream_id("u1") != wallet_stream_id("U1")
    assert wallet_stream_id("u1").version == 5  # never a payment's UUIDv7


def test_an_event_read_as_another_kind_is_refused() -> None:
    raw = wallet_event_to_json(debited(2_500, 7_500))
    assert parse_wallet_event(raw).event_type == "WalletDebited"
    tampered = raw.replace(b'"WalletDebited"', b'"TopUpReceived"')
    with pytest.raises(ValidationError):
        parse_wallet_event(tampered)
