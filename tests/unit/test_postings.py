"""Accounts and postings (kessai/postings.py): every movement balanced, each route as the ledger
model says, and the postings of events stored before postings existed derived from them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kessai.events import (
    SCHEMA_VERSION,
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    parse_event,
)
from kessai.ids import new_id
from kessai.ledger import fold, postings_of
from kessai.money import MAX_AMOUNT
from kessai.postings import (
    WORLD_ACQUIRER,
    Posting,
    balances,
    capture_postings,
    imbalance,
    kind_of,
    may_go_negative,
    refund_postings,
    topup_account,
    transfer,
)

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
PAYMENT_ID = uuid.UUID("0190c0de-1234-7abc-8def-0123456789ab")


def captured(method: str, amount: int = 1_000, **envelope: Any) -> PaymentCaptured:
    return PaymentCaptured(
        **envelope,
        event_id=new_id(),
        payment_id=PAYMENT_ID,
        version=1,
        merchant_id="shop-1",
        occurred_at=T0,
        recorded_at=T0,
        payload=PaymentCapturedPayload(
            amount=amount,
            currency="JPY",
            user_id="u1",
            method=method,
        ),
    )


def refunded(amount: int, total: int, version: int = 2, **envelope: Any) -> PaymentRefunded:
    return PaymentRefunded(
        **envelope,
        event_id=new_id(),
        payment_id=PAYMENT_ID,
        version=version,
        merchant_id="shop-1",
        occurred_at=T0,
        recorded_at=T0,
        payload=PaymentRefundedPayload(
            refund_id=new_id(), amount=amount, currency="JPY", refunded_amount=total
        ),
    )


def test_a_balance_payment_moves_money_from_the_wallet_to_the_merchant() -> None:
    assert capture_postings("balance", "u1", "shop-1", 500) == (
        Posting(account="user:u1", amount=-500),
        Posting(account="merchant:shop-1", amount=500),
    )


def test_a_card_payment_moves_money_from_the_acquirer_to_the_merchant() -> None:
    assert capture_postings("card", "u1", "shop-1", 500) == (
        Posting(account=WORLD_ACQUIRER, amount=-500),
        Posting(account="merchant:shop-1", amount=500),
    )


@pytest.mark.parametrize("method", ["balance", "card"])
def test_a_refund_is_the_reverse_of_its_payments_route(method: str) -> None:
    forward = capture_postings(method, "u1", "shop-1", 300)
    back = refund_postings(method, "u1", "shop-1", 300)
    assert {(p.account, -p.amount) for p in forward} == {(p.account, p.amount) for p in back}


def test_a_top_up_comes_from_its_source_in_the_world() -> None:
    assert transfer(topup_account("convenience_store"), "user:u1", 2_000) == (
        Posting(account="world:topup:convenience_store", amount=-2_000),
        Posting(account="user:u1", amount=2_000),
    )


@pytest.mark.parametrize("method", ["balance", "card"])
def test_events_stored_without_postings_get_them_derived(method: str) -> None:
    """The upcaster: a capture's postings from its payload; a refund's from its payment."""
    capture, first, second = captured(method), refunded(200, 200), refunded(300, 500, 3)
    payment = fold([capture])
    after_first = fold([capture, first])
    assert postings_of(capture) == capture_postings(method, "u1", "shop-1", 1_000)
    assert postings_of(first, payment) == refund_postings(method, "u1", "shop-1", 200)
    assert postings_of(second, after_first) == refund_postings(method, "u1", "shop-1", 300)
    every = [*postings_of(capture), *postings_of(first, payment)]
    every += postings_of(second, after_first)
    assert imbalance(every) == 0
    source = "user:u1" if method == "balance" else WORLD_ACQUIRER
    assert balances(every) == {source: -500, "merchant:shop-1": 500}


def test_a_refunds_postings_need_its_payment() -> None:
    with pytest.raises(ValueError, match="need its payment"):
        postings_of(refunded(200, 200))


@given(
    st.lists(
        st.tuples(st.sampled_from(["balance", "card"]), st.integers(1, MAX_AMOUNT)), max_size=20
    )
)
def test_every_route_balances(movements: list[tuple[str, int]]) -> None:
    for method, amount in movements:
        assert imbalance(capture_postings(method, "u1", "shop-1", amount)) == 0
        assert imbalance(refund_postings(method, "u1", "shop-1", amount)) == 0


@pytest.mark.parametrize(
    ("account", "kind", "negative"),
    [
        ("user:u1", "user", False),
        ("merchant:shop-1", "merchant", True),
        ("campaign:spring-2026", "campaign", False),
        ("world:acquirer", "world", True),
        ("world:bank", "world", True),
        ("world:topup:bank", "world", True),
    ],
)
def test_only_merchants_and_the_world_may_go_negative(
    account: str, kind: str, negative: bool
) -> None:
    assert Posting(account=account, amount=1).account == account
    assert kind_of(account) == kind
    assert may_go_negative(account) is negative


@pytest.mark.parametrize(
    "account",
    [
        "user:",
        "user:a b",
        "wallet:u1",
        "world:elsewhere",
        "world:topup:",
        "world:topup:Bank",
        "merchant:" + "m" * 65,
        "user:u1\n",
    ],
)
def test_a_posting_to_an_account_that_cannot_exist_is_refused(account: str) -> None:
    with pytest.raises(ValidationError):
        Posting(account=account, amount=1)


@pytest.mark.parametrize("amount", [0, MAX_AMOUNT + 1, -MAX_AMOUNT - 1, 1.0, "1", True])
def test_a_posting_moves_a_whole_non_zero_amount(amount: object) -> None:
    with pytest.raises(ValidationError):
        Posting(account="user:u1", amount=amount)


@pytest.mark.parametrize("amount", [0, -1])
def test_a_transfer_moves_a_positive_amount(amount: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        transfer("user:u1", "merchant:shop-1", amount)


def test_an_event_with_its_postings_is_of_the_current_schema_version_and_keeps_them() -> None:
    route = capture_postings("balance", "u1", "shop-1", 1_000)
    event = captured("balance", postings=route)
    assert event.schema_version == SCHEMA_VERSION == 2
    again = parse_event(event_to_json(event))
    assert again == event
    assert postings_of(again) == route
    assert b'"postings":[{"account":"user:u1","amount":-1000}' in event_to_json(event)


def test_an_event_without_postings_is_of_version_1_and_its_json_has_no_postings() -> None:
    event = captured("card")
    assert event.schema_version == 1
    assert b"postings" not in event_to_json(event)


def test_postings_that_do_not_balance_are_refused() -> None:
    with pytest.raises(ValidationError, match="sum to 1"):
        captured(
            "balance",
            postings=(
                Posting(account="user:u1", amount=-999),
                Posting(account="merchant:shop-1", amount=1_000),
            ),
        )


def test_the_schema_version_and_the_postings_must_agree() -> None:
    route = capture_postings("card", "u1", "shop-1", 1_000)
    with pytest.raises(ValidationError, match="carries no postings"):
        captured("card", schema_version=1, postings=route)
    with pytest.raises(ValidationError, match="carries its postings"):
        captured("card", schema_version=2)
    with pytest.raises(ValidationError):
        captured("card", postings=route[:1])  # one posting cannot balance a movement
