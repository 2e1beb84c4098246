"""What a user owes campaigns: cashback a refund took back after the wallet had spent it.

A refund of a rewarded payment takes back its share of the cashback (``kessai.grants.take_back``)
from the wallet, but never more than the wallet holds: a wallet is never negative. What it
cannot give back is a debt to the campaign, paid off first from the user's later credits
(top-ups, refunds to the wallet, grants), oldest debt first. ``Debts`` is a user's open debts
as the newest row of the write store's ``reward_debts`` records them; ``pay_off`` is the
arithmetic of one credit paying them, without I/O.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Debt:
    """What a user still owes one campaign of one refund's take-back."""

    campaign_id: str
    payment_id: uuid.UUID
    refund_id: uuid.UUID
    owed: int
    """> 0: a debt paid off in full is no longer listed."""


@dataclass(frozen=True, slots=True)
class Payment:
    """What one credit pays of one debt."""

    debt: Debt
    amount: int
    """> 0, at most ``debt.owed``."""

    @property
    def owed_after(self) -> int:
        return self.debt.owed - self.amount


@dataclass(frozen=True, slots=True)
class Debts:
    """A user's open debts, oldest first, and the version of the row that records them (the
    next change is ``version + 1``; 0: the user never owed anything)."""

    user_id: str
    version: int
    currency: str | None
    """The wallet's currency; ``None`` while the user never owed anything."""
    items: tuple[Debt, ...] = ()

    @classmethod
    def none(cls, user_id: str) -> Debts:
        return cls(user_id=user_id, version=0, currency=None)

    @property
    def total(self) -> int:
        return sum(debt.owed for debt in self.items)

    def add(self, debt: Debt, currency: str) -> Debts:
        """These debts and ``debt``, the newest."""
        if debt.owed <= 0:
            raise ValueError(f"a debt is positive, not {debt.owed}")
        return replace(self, currency=currency, items=(*self.items, debt))

    def pay_off(self, balance: int) -> tuple[list[Payment], Debts]:
        """What a wallet holding ``balance`` pays of these debts, oldest first, and the debts
        left after it."""
        payments: list[Payment] = []
        left: list[Debt] = []
        for debt in self.items:
            amount = min(balance, debt.owed)
            balance -= amount
            if amount > 0:
                payments.append(Payment(debt, amount))
            if amount < debt.owed:
                left.append(replace(debt, owed=debt.owed - amount))
        return payments, replace(self, items=tuple(left))


def debts_to_json(debts: Debts) -> str:
    """The ``body`` of a ``reward_debts`` row: the open debts, oldest first."""
    return json.dumps(
        [
            {
                "campaign_id": d.campaign_id,
                "payment_id": str(d.payment_id),
                "refund_id": str(d.refund_id),
                "owed": d.owed,
            }
            for d in debts.items
        ],
        separators=(",", ":"),
    )


def parse_debts(user_id: str, version: int, currency: str, body: str) -> Debts:
    """The debts a ``reward_debts`` row records."""
    items = tuple(
        Debt(
            campaign_id=str(d["campaign_id"]),
            payment_id=uuid.UUID(d["payment_id"]),
            refund_id=uuid.UUID(d["refund_id"]),
            owed=int(d["owed"]),
        )
        for d in json.loads(body)
    )
    return Debts(user_id=user_id, version=version, currency=currency, items=items)
