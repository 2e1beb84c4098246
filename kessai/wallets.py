"""A wallet: a user's stored-value balance (残高), which never goes below zero.

A wallet is its own stream of movements, each recording the balance after it, so its balance is
its newest movement: one read, however long its history. Movements are decided here, without
I/O, against the wallet as it stands; the write path records them with the version after the
wallet's, so two writers deciding against the same balance collide on that version and one of
them decides again (the optimistic rule payments already follow).

- A top-up (``top_up``) credits the wallet, up to its balance limit.
- A balance payment (``debit``) takes its amount out, if the balance covers it.
- A refund of a balance payment (``credit``) puts the refunded amount back; the limit does not
  refuse it (the money was the user's).
- A campaign's grant (``RewardGranted``) puts cashback or a bonus in; its take-back
  (``RewardTakenBack``, after a refund of the payment) takes back at most the balance: what the
  wallet cannot give is a debt (``rewards/``), never a negative balance.

A wallet holds one currency: the first movement fixes it. What a refusal says is in its
``details`` as numbers (balance, requested, shortfall), so a client can act on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from kessai.errors import ApiError
from kessai.events import (
    AnyWalletEvent,
    RewardGranted,
    RewardTakenBack,
    TopUpReceived,
    WalletDebited,
)
from kessai.ledger import InvariantViolation

MovementKind = Literal["top_up", "payment", "refund", "reward", "reward_takeback"]


@dataclass(frozen=True, slots=True)
class Wallet:
    user_id: str
    currency: str | None
    """``None`` until the first movement fixes it."""
    balance: int
    version: int
    """Movements so far: the next one is ``version + 1``."""

    @classmethod
    def empty(cls, user_id: str) -> Wallet:
        """A wallet nothing has moved in yet: a user who never topped up pays from this."""
        return cls(user_id=user_id, currency=None, balance=0, version=0)


@dataclass(frozen=True, slots=True)
class Movement:
    kind: MovementKind
    version: int
    amount: int
    """Signed: positive into the wallet (top-up, refund), negative out of it (payment)."""
    currency: str
    balance_after: int


def apply_movement(wallet: Wallet, movement: Movement) -> Wallet:
    """``wallet`` after ``movement``; ``InvariantViolation`` if it cannot follow (a gap, another
    currency, a balance that does not add up or would be negative)."""
    if movement.version != wallet.version + 1:
        raise InvariantViolation(
            f"wallet {wallet.user_id}: movement {movement.version} does not follow {wallet.version}"
        )
    if wallet.currency is not None and movement.currency != wallet.currency:
        raise InvariantViolation(
            f"wallet {wallet.user_id} holds {wallet.currency}, not {movement.currency}"
        )
    if movement.balance_after != wallet.balance + movement.amount:
        raise InvariantViolation(
            f"wallet {wallet.user_id}: {wallet.balance} {movement.amount:+d} is not "
            f"{movement.balance_after}"
        )
    if movement.balance_after < 0:
        raise InvariantViolation(f"wallet {wallet.user_id} would hold {movement.balance_after}")
    return replace(
        wallet,
        currency=movement.currency,
        balance=movement.balance_after,
        version=movement.version,
    )


def fold_wallet(user_id: str, movements: Iterable[Movement]) -> Wallet:
    """The wallet after ``movements`` (in version order)."""
    wallet = Wallet.empty(user_id)
    for movement in movements:
        wallet = apply_movement(wallet, movement)
    return wallet


def _currency_mismatch(wallet: Wallet, currency: str) -> ApiError:
    return ApiError(
        422,
        "currency_mismatch",
        f"This wallet holds {wallet.currency}; the request is in {currency}.",
        {"wallet_currency": wallet.currency, "requested_currency": currency},
    )


def _movement(wallet: Wallet, kind: MovementKind, amount: int, currency: str) -> Movement:
    return Movement(
        kind=kind,
        version=wallet.version + 1,
        amount=amount,
        currency=currency,
        balance_after=wallet.balance + amount,
    )


def top_up(wallet: Wallet, amount: int, currency: str, *, limit: int) -> Movement:
    """Credit ``amount`` (> 0); ``409 balance_limit_exceeded`` past ``limit``, ``422
    currency_mismatch`` in another currency than the wallet's."""
    if wallet.currency is not None and currency != wallet.currency:
        raise _currency_mismatch(wallet, currency)
    if wallet.balance + amount > limit:
        raise ApiError(
            409,
            "balance_limit_exceeded",
            f"A top-up of {amount} would take the balance over its limit of {limit} {currency}.",
            {
                "balance": wallet.balance,
                "requested": amount,
                "limit": limit,
                "headroom": max(0, limit - wallet.balance),
                "currency": currency,
            },
        )
    return _movement(wallet, "top_up", amount, currency)


def debit(wallet: Wallet, amount: int, currency: str) -> Movement:
    """Take ``amount`` (> 0) out for a payment; ``402 insufficient_balance`` when the balance
    does not cover it (an empty wallet has a balance of 0 in any currency), ``422
    currency_mismatch`` in another currency than the wallet's."""
    if wallet.currency is not None and currency != wallet.currency:
        raise _currency_mismatch(wallet, currency)
    if amount > wallet.balance:
        raise ApiError(
            402,
            "insufficient_balance",
            f"The balance ({wallet.balance} {currency}) does not cover {amount}.",
            {
                "balance": wallet.balance,
                "requested": amount,
                "shortfall": amount - wallet.balance,
                "currency": currency,
            },
        )
    return _movement(wallet, "payment", -amount, currency)


def credit(wallet: Wallet, amount: int, currency: str) -> Movement:
    """Put ``amount`` (> 0) back for a refund of a payment from this wallet. Never refused: a
    refund in another currency than the wallet's is a ledger bug (``InvariantViolation``).
    The wallet may be empty: a balance payment recorded before wallets were (schema version
    1) debited none, and its refund is the wallet's first movement, in the payment's
    currency."""
    if wallet.currency is not None and wallet.currency != currency:
        raise InvariantViolation(
            f"a refund in {currency} to wallet {wallet.user_id} holding {wallet.currency}"
        )
    return _movement(wallet, "refund", amount, currency)


def movement_of(event: AnyWalletEvent) -> Movement:
    """The movement a stored wallet event records (its stream's fold is ``fold_wallet``)."""
    p = event.payload
    if isinstance(event, TopUpReceived):
        kind: MovementKind = "top_up"
        amount = p.amount
    elif isinstance(event, WalletDebited):
        kind, amount = "payment", -p.amount
    elif isinstance(event, RewardGranted):
        kind, amount = "reward", p.amount
    elif isinstance(event, RewardTakenBack):
        kind, amount = "reward_takeback", -p.amount
    else:
        kind, amount = "refund", p.amount
    return Movement(
        kind=kind,
        version=event.version,
        amount=amount,
        currency=p.currency,
        balance_after=p.balance_after,
    )
