"""``RewardGranted``, the wallet event of a campaign's grant (kessai/events.py): it posts from
the campaign's budget account to the wallet and nowhere else, says what the budget cut, and
folds into the wallet like any movement. ``RewardTakenBack``, its reverse after a refund: it
posts from the wallet back to the campaign, gives back what is due less what stays owed, and
never takes the wallet below zero."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from kessai.events import (
    RewardGranted,
    RewardGrantedPayload,
    RewardTakenBack,
    RewardTakenBackPayload,
    TopUpReceived,
    TopUpReceivedPayload,
    parse_any_event,
    parse_wallet_event,
    stream_of,
    wallet_event_to_json,
    wallet_stream_id,
)
from kessai.ids import new_id
from kessai.ledger import InvariantViolation
from kessai.postings import imbalance, transfer
from kessai.wallets import fold_wallet, movement_of

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
PAYMENT_ID = uuid.UUID("0190c0de-1234-7abc-8def-0123456789ab")


def granted(
    amount: int = 200,
    *,
    requested: int | None = None,
    version: int = 1,
    balance_after: int | None = None,
    postings: Any = "default",
    **payload: Any,
) -> RewardGranted:
    fields: dict[str, Any] = {
        "campaign_id": "cb-2026",
        "kind": "cashback",
        "payment_id": PAYMENT_ID,
        "amount": amount,
        "requested": amount if requested is None else requested,
        "currency": "JPY",
        "balance_after": amount if balance_after is None else balance_after,
        **payload,
    }
    if postings == "default":
        postings = transfer(f"campaign:{fields['campaign_id']}", "user:u1", amount)
    return RewardGranted(
        event_id=new_id(),
        user_id="u1",
        version=version,
        occurred_at=T0,
        recorded_at=T0,
        postings=postings,
        payload=RewardGrantedPayload(**fields),
    )


def test_a_grant_survives_its_json_form_on_its_wallets_stream() -> None:
    event = granted(requested=400)
    raw = wallet_event_to_json(event)
    assert parse_wallet_event(raw) == event == parse_any_event(raw)
    assert stream_of(event) == wallet_stream_id("u1")
    assert event.payload.cut
    assert not granted().payload.cut


def test_a_grant_posts_from_its_campaign_to_the_wallet_and_balances() -> None:
    event = granted(300)
    assert event.postings is not None
    assert {(p.account, p.amount) for p in event.postings} == {
        ("campaign:cb-2026", -300),
        ("user:u1", 300),
    }
    assert imbalance(event.postings) == 0


@pytest.mark.parametrize(
    "postings",
    [
        None,
        transfer("campaign:another", "user:u1", 200),
        transfer("campaign:cb-2026", "user:u2", 200),
        transfer("campaign:cb-2026", "user:u1", 201),
        transfer("world:bank", "user:u1", 200),
    ],
)
def test_a_grant_that_posts_anything_else_is_refused(postings: Any) -> None:
    with pytest.raises(ValidationError, match="a grant posts"):
        granted(200, postings=postings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"requested": 100}, "at most what the rules gave"),
        ({"payment_id": None}, "a cashback names its payment"),
        ({"kind": "welcome_bonus"}, "a welcome bonus names none"),
        ({"amount": 0}, "greater than 0"),
        ({"balance_after": -1}, "greater than or equal to 0"),
        ({"campaign_id": "no spaces"}, "pattern"),
    ],
)
def test_a_grant_that_cannot_be_is_refused(change: dict[str, Any], message: str) -> None:
    amount = change.pop("amount", 200)
    with pytest.raises(ValidationError, match=message):
        granted(amount, postings=None if amount == 0 else "default", **change)


def test_a_welcome_bonus_names_no_payment() -> None:
    event = granted(500, kind="welcome_bonus", payment_id=None, campaign_id="welcome")
    assert event.payload.payment_id is None
    assert parse_wallet_event(wallet_event_to_json(event)) == event


def test_a_grant_folds_into_the_wallet_as_a_reward() -> None:
    top_up = TopUpReceived(
        event_id=new_id(),
        user_id="u1",
        version=1,
        occurred_at=T0,
        recorded_at=T0,
        postings=transfer("world:topup:bank", "user:u1", 1_000),
        payload=TopUpReceivedPayload(
            top_up_id=new_id(), amount=1_000, currency="JPY", source="bank", balance_after=1_000
        ),
    )
    grant = granted(200, version=2, balance_after=1_200)
    assert movement_of(grant).kind == "reward"
    wallet = fold_wallet("u1", [movement_of(top_up), movement_of(grant)])
    assert (wallet.version, wallet.balance) == (2, 1_200)
    with pytest.raises(InvariantViolation):
        fold_wallet("u1", [movement_of(top_up), movement_of(granted(200, version=2))])


def taken_back(
    amount: int = 150, *, due: int = 200, owed: int = 50, postings: Any = "default", **payload: Any
) -> RewardTakenBack:
    fields: dict[str, Any] = {
        "campaign_id": "cb-2026",
        "kind": "refund",
        "payment_id": PAYMENT_ID,
        "refund_id": uuid.UUID(int=9),
        "due": due,
        "amount": amount,
        "owed": owed,
        "currency": "JPY",
        "balance_after": 0,
        **payload,
    }
    if postings == "default":
        postings = transfer("user:u1", f"campaign:{fields['campaign_id']}", amount)
    return RewardTakenBack(
        event_id=new_id(),
        user_id="u1",
        version=2,
        occurred_at=T0,
        recorded_at=T0,
        postings=postings,
        payload=RewardTakenBackPayload(**fields),
    )


def test_a_take_back_posts_from_the_wallet_to_its_campaign_and_folds_as_one() -> None:
    event = taken_back()
    raw = wallet_event_to_json(event)
    assert parse_wallet_event(raw) == event == parse_any_event(raw)
    assert stream_of(event) == wallet_stream_id("u1")
    assert event.postings is not None
    assert {(p.account, p.amount) for p in event.postings} == {
        ("campaign:cb-2026", 150),
        ("user:u1", -150),
    }
    assert movement_of(event).kind == "reward_takeback"
    wallet = fold_wallet("u1", [movement_of(granted(150)), movement_of(event)])
    assert (wallet.version, wallet.balance) == (2, 0)
    with pytest.raises(InvariantViolation):  # it never takes more than the wallet holds
        fold_wallet("u1", [movement_of(granted(100)), movement_of(event)])


@pytest.mark.parametrize(
    "postings",
    [
        None,
        transfer("campaign:cb-2026", "user:u1", 150),
        transfer("user:u1", "campaign:another", 150),
        transfer("user:u1", "campaign:cb-2026", 200),
    ],
)
def test_a_take_back_that_posts_anything_else_is_refused(postings: Any) -> None:
    with pytest.raises(ValidationError, match="a take-back posts"):
        taken_back(postings=postings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"owed": 0}, "150 given back and 0 owed is not 200"),
        ({"due": 100, "owed": 0}, "is not 100"),
        ({"owed": -50, "due": 100}, "greater than or equal to 0"),
        ({"kind": "gift"}, "'refund' or 'debt'"),
    ],
)
def test_a_take_back_that_cannot_be_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        taken_back(**change)
