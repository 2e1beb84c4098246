"""Accounts and postings: every movement of money is a balanced set of postings between accounts.

kessai is a double-entry ledger. An event that moves money moves it between accounts, as a list
of postings: each an account and a signed amount in the event's currency, positive when the
account's balance goes up, negative when it goes down, and the amounts of one event sum to zero.
So the sum of every posting ever made is zero per currency (the trial balance), and an account's
balance is the sum of its postings.

Accounts are named by kind:

- ``user:<user_id>``: a user's wallet (the stored-value balance). Never negative.
- ``merchant:<merchant_id>``: what kessai owes the merchant; up with payments, down with refunds
  and payouts. May go negative (a refund after a payout).
- ``campaign:<campaign_id>``: a campaign's budget.
- ``world:...``: where money enters or leaves the system: ``world:acquirer`` (card payments),
  ``world:bank`` (payouts), ``world:topup:<source>`` (top-ups). Negative by nature.

Only wallets must never go negative; they are the accounts the write path checks. The others'
balances are derived from the postings on the read side, so a merchant with a third of the
traffic never becomes one hot row to update on every payment.

Events written before postings existed carry none: ``kessai.ledger.postings_of`` derives
theirs from what they do carry (the upcaster), so no stored event is ever rewritten.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kessai.money import MAX_AMOUNT

AccountKind = Literal["user", "merchant", "campaign", "world"]

_ID = r"[A-Za-z0-9_-]{1,64}"
ACCOUNT_PATTERN = (
    rf"^(?:(?:user|merchant|campaign):{_ID}|world:(?:acquirer|bank|fees|topup:[a-z0-9_]{{1,32}}))$"
)
AccountName = Annotated[str, Field(pattern=ACCOUNT_PATTERN, max_length=80)]
"""``user:<id>``, ``merchant:<id>``, ``campaign:<id>`` or one of the ``world:`` accounts."""

TOPUP_SOURCE_PATTERN = r"^[a-z0-9_]{1,32}$"
"""A top-up's source (``bank``, ``card``, ``convenience_store``): lower case, digits, ``_``."""

WORLD_ACQUIRER = "world:acquirer"
"""Card payments: the money the acquirer collects from the card holder."""


def _not_zero(amount: int) -> int:
    if amount == 0:
        raise ValueError("a posting moves money: its amount is never 0")
    return amount


PostingAmount = Annotated[
    int, Field(strict=True, ge=-MAX_AMOUNT, le=MAX_AMOUNT), AfterValidator(_not_zero)
]


class Posting(BaseModel):
    """One account's side of a movement: ``amount`` (minor units, never 0) is added to its
    balance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    account: AccountName
    amount: PostingAmount


def user_account(user_id: str) -> str:
    return f"user:{user_id}"


def merchant_account(merchant_id: str) -> str:
    return f"merchant:{merchant_id}"


def campaign_account(campaign_id: str) -> str:
    return f"campaign:{campaign_id}"


def topup_account(source: str) -> str:
    return f"world:topup:{source}"


def kind_of(account: str) -> AccountKind:
    kind = account.partition(":")[0]
    if kind not in ("user", "merchant", "campaign", "world"):
        raise ValueError(f"not an account name: {account!r}")
    return kind  # type: ignore[return-value]


def may_go_negative(account: str) -> bool:
    """Merchant and world accounts may; a wallet (and a campaign budget) may not."""
    return kind_of(account) in ("merchant", "world")


def transfer(source: str, destination: str, amount: int) -> tuple[Posting, Posting]:
    """``amount`` (> 0) moved from ``source`` to ``destination``."""
    if amount <= 0:
        raise ValueError(f"a transfer moves a positive amount, not {amount}")
    return Posting(account=source, amount=-amount), Posting(account=destination, amount=amount)


def payment_source(method: str, user_id: str) -> str:
    """Where a payment's money comes from: the user's wallet for ``balance``, the acquirer for
    ``card``."""
    if method == "balance":
        return user_account(user_id)
    if method == "card":
        return WORLD_ACQUIRER
    raise ValueError(f"unknown payment method: {method!r}")


def capture_postings(
    method: str, user_id: str, merchant_id: str, amount: int
) -> tuple[Posting, ...]:
    """A captured payment: its source (wallet or acquirer) to the merchant."""
    return transfer(payment_source(method, user_id), merchant_account(merchant_id), amount)


def refund_postings(
    method: str, user_id: str, merchant_id: str, amount: int
) -> tuple[Posting, ...]:
    """A refund: the reverse of its payment's route, for the refunded amount."""
    return transfer(merchant_account(merchant_id), payment_source(method, user_id), amount)


def imbalance(postings: Iterable[Posting]) -> int:
    """The sum of ``postings`` (of one currency): 0 for a balanced movement."""
    return sum(p.amount for p in postings)


def balances(postings: Iterable[Posting]) -> dict[str, int]:
    """Each account's balance: the sum of its postings."""
    found: dict[str, int] = defaultdict(int)
    for posting in postings:
        found[posting.account] += posting.amount
    return dict(found)
