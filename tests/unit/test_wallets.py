"""The wallet rule (kessai/wallets.py): never below zero, never over its limit by a top-up, one
currency; every refusal says its numbers and changes nothing; the fold of what was accepted is
the wallet."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kessai.errors import ApiError
from kessai.ledger import InvariantViolation
from kessai.wallets import Movement, Wallet, apply_movement, credit, debit, fold_wallet, top_up

LIMIT = 1_000_000


def funded(balance: int, currency: str = "JPY") -> Wallet:
    return apply_movement(
        Wallet.empty("u1"), top_up(Wallet.empty("u1"), balance, currency, limit=LIMIT)
    )


def test_a_payment_the_balance_covers_takes_it_out() -> None:
    wallet = funded(10_000)
    movement = debit(wallet, 10_000, "JPY")
    assert movement == Movement("payment", 2, -10_000, "JPY", 0)
    assert apply_movement(wallet, movement).balance == 0


def test_a_payment_the_balance_does_not_cover_is_402_with_its_numbers() -> None:
    with pytest.raises(ApiError) as refused:
        debit(funded(150), 200, "JPY")
    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert refused.value.details == {
        "balance": 150,
        "requested": 200,
        "shortfall": 50,
        "currency": "JPY",
    }


def test_a_user_who_never_topped_up_has_a_balance_of_zero_not_no_wallet() -> None:
    with pytest.raises(ApiError) as refused:
        debit(Wallet.empty("stranger"), 100, "USD")
    assert refused.value.status == 402
    assert refused.value.details == {
        "balance": 0,
        "requested": 100,
        "shortfall": 100,
        "currency": "USD",
    }


def test_a_top_up_over_the_limit_is_409_with_the_headroom() -> None:
    with pytest.raises(ApiError) as refused:
        top_up(funded(999_000), 2_000, "JPY", limit=LIMIT)
    assert (refused.value.status, refused.value.code) == (409, "balance_limit_exceeded")
    assert refused.value.details == {
        "balance": 999_000,
        "requested": 2_000,
        "limit": LIMIT,
        "headroom": 1_000,
        "currency": "JPY",
    }
    assert top_up(funded(999_000), 1_000, "JPY", limit=LIMIT).balance_after == LIMIT


def test_a_refund_goes_back_even_past_the_limit() -> None:
    full = funded(LIMIT)
    paid = apply_movement(full, debit(full, 5_000, "JPY"))
    topped = apply_movement(paid, top_up(paid, 5_000, "JPY", limit=LIMIT))
    assert apply_movement(topped, credit(topped, 5_000, "JPY")).balance == LIMIT + 5_000


@pytest.mark.parametrize("decide", [debit, lambda w, a, c: top_up(w, a, c, limit=LIMIT)])
def test_the_first_movement_fixes_the_currency(decide: object) -> None:
    with pytest.raises(ApiError) as refused:
        decide(funded(1_000, "JPY"), 100, "USD")  # type: ignore[operator]
    assert (refused.value.status, refused.value.code) == (422, "currency_mismatch")
    assert refused.value.details == {"wallet_currency": "JPY", "requested_currency": "USD"}


def test_a_refund_in_another_currency_is_a_ledger_bug() -> None:
    with pytest.raises(InvariantViolation):
        credit(funded(1_000, "JPY"), 100, "USD")


@pytest.mark.parametrize(
    "movement",
    [
        Movement("payment", 3, -100, "JPY", 900),  # a gap
        Movement("payment", 2, -100, "USD", 900),  # another currency
        Movement("payment", 2, -100, "JPY", 950),  # does not add up
        Movement("payment", 2, -1_100, "JPY", -100),  # below zero
    ],
)
def test_a_movement_that_cannot_follow_is_refused_by_the_fold(movement: Movement) -> None:
    with pytest.raises(InvariantViolation):
        apply_movement(funded(1_000), movement)


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["top_up", "debit", "credit"]), st.integers(1, 400_000)),
    max_size=60,
)


@given(OPERATIONS)
def test_whatever_is_asked_the_wallet_never_goes_below_zero_and_is_the_fold(
    operations: list[tuple[str, int]],
) -> None:
    """Any sequence of top-ups, payments and refunds (a refund only of what was paid): every
    accepted movement keeps the balance at or above zero and a top-up keeps it within the
    limit; a refused one changes nothing; the fold of the accepted movements is the wallet."""
    wallet, accepted, paid = Wallet.empty("u1"), [], 0
    refusals: set[str] = set()
    for kind, amount in operations:
        try:
            if kind == "top_up":
                movement = top_up(wallet, amount, "JPY", limit=LIMIT)
            elif kind == "debit":
                movement = debit(wallet, amount, "JPY")
            elif paid >= amount:
                movement = credit(wallet, amount, "JPY")
            else:
                continue
        except ApiError as refusal:
            refusals.add(refusal.code)
            continue
        wallet = apply_movement(wallet, movement)
        accepted.append(movement)
        paid += -movement.amount if kind == "debit" else (-amount if kind == "credit" else 0)
        assert wallet.balance >= 0
        if kind == "top_up":
            assert wallet.balance <= LIMIT
    assert refusals <= {"insufficient_balance", "balance_limit_exceeded"}
    assert fold_wallet("u1", accepted) == wallet
    assert wallet.balance == sum(m.amount for m in accepted)


def test_a_refund_of_a_payment_from_before_wallets_opens_the_wallet_in_its_currency() -> None:
    """A balance payment recorded before wallets existed debited no wallet: its refund is the
    wallet's first movement, and fixes its currency."""
    movement = credit(Wallet.empty("u1"), 700, "USD")
    wallet = apply_movement(Wallet.empty("u1"), movement)
    assert (wallet.currency, wallet.balance, wallet.version) == ("USD", 700, 1)
    with pytest.raises(ApiError) as refused:
        debit(wallet, 100, "JPY")
    assert refused.value.code == "currency_mismatch"
