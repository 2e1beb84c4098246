"""The wallet movements the payments owe: every captured balance payment, and every refund of
one, has its wallet's side in the write store (``WalletDebited``, ``WalletCredited``), written in
the same transaction, of the amount its postings move to or from that wallet.

``wallet_chain`` (``reconciler.wallets``) checks each movement against its payment; this is the
other direction: each payment event in scope whose postings move a user's wallet against the
movements of that wallet. The trial balance, which already walks the events in scope, collects
what they owe (``owed_by``); the movements are then looked up in bulk, a chunk of users at a time
(``unmoved``). Events stored before postings existed (schema version 1) owe nothing: no wallet
moved then, their postings are derived (``kessai.ledger.postings_of``).

A movement missing, or of another amount, is a ``wallet_movement`` finding, never repaired: the
write store is the truth, an operator must look.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
import sqlalchemy as sa

from kessai.events import PaymentCaptured, PaymentRefunded
from kessai.ids import bound_at_ms, timestamp_ms
from kessai.postings import kind_of
from kessai.schema import write
from reconciler.context import RunContext
from reconciler.records import SCOPE_SLACK, Finding

SIDES = ("WalletDebited", "WalletCredited")
"""The wallet events that are a payment's (a refund's) side."""


@dataclass(frozen=True, slots=True)
class Owed:
    """A movement a payment event owes a wallet: ``amount`` signed as the wallet sees it
    (negative out of it: a payment; positive into it: a refund)."""

    payment_id: uuid.UUID
    version: int
    refund_id: uuid.UUID | None
    merchant_id: str
    user_id: str
    amount: int

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID | None]:
        return self.payment_id, self.refund_id


def owed_by(event: PaymentCaptured | PaymentRefunded) -> list[Owed]:
    """What ``event`` owes the wallets its postings move (none for a card payment, nor for an
    event without postings of its own)."""
    if event.postings is None:
        return []
    moved: dict[str, int] = defaultdict(int)
    for posting in event.postings:
        if kind_of(posting.account) == "user":
            moved[posting.account.partition(":")[2]] += posting.amount
    refund_id = event.payload.refund_id if isinstance(event, PaymentRefunded) else None
    return [
        Owed(event.payment_id, event.version, refund_id, event.merchant_id, user_id, amount)
        for user_id, amount in sorted(moved.items())
        if amount != 0
    ]


Moved = dict[tuple[str, uuid.UUID, uuid.UUID | None], list[tuple[int, int]]]
"""(user, payment, refund or None) -> [(wallet version, amount)] of the movements found."""


def unmoved(ctx: RunContext, owed: Sequence[Owed], lower: uuid.UUID | None) -> list[Finding]:
    """A ``wallet_movement`` finding for each of ``owed`` its wallet does not hold, or holds of
    another amount. Looked up a chunk of users at a time, from shortly before the scope (the
    movement is written with its payment's event, so its id is within milliseconds of it); only
    what is not found there is looked for again in the whole wallet."""
    by_user: dict[str, list[Owed]] = defaultdict(list)
    for o in owed:
        by_user[o.user_id].append(o)
    users = sorted(by_user)
    since = None if lower is None else bound_at_ms(timestamp_ms(lower) - _slack_ms())
    found: list[Finding] = []
    size = ctx.settings.reconcile_chunk_size
    with ctx.write.connect() as conn:
        for first in range(0, len(users), size):
            chunk = users[first : first + size]
            moved = _moved(conn, chunk, since)
            missing = [o for u in chunk for o in by_user[u] if (u, *o.key) not in moved]
            if missing and since is not None:  # rare: only when something is amiss
                moved.update(_moved(conn, sorted({o.user_id for o in missing}), None))
            found += _findings((o for u in chunk for o in by_user[u]), moved)
    return found


def _slack_ms() -> int:
    return int(SCOPE_SLACK.total_seconds() * 1000)


def _moved(conn: sa.Connection, users: Sequence[str], since: uuid.UUID | None) -> Moved:
    w = write.wallet_events.c
    query = sa.select(w.user_id, w.version, w.amount, w.body).where(
        w.user_id.in_(users), w.event_type.in_(SIDES)
    )
    if since is not None:
        query = query.where(w.event_id >= since)
    moved: Moved = defaultdict(list)
    for user_id, version, amount, body in conn.execute(query):
        try:
            payload = orjson.loads(body)["payload"]
            payment_id = uuid.UUID(payload["payment_id"])
            refund = payload.get("refund_id")
            refund_id = None if refund is None else uuid.UUID(refund)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # not a side of any payment: the chain's check says what is wrong with it
        moved[(user_id, payment_id, refund_id)].append((version, amount))
    return moved


def _findings(owed: Iterable[Owed], moved: Moved) -> list[Finding]:
    found = []
    for o in owed:
        sides = moved.get((o.user_id, *o.key), [])
        amount = sum(a for _, a in sides) if sides else None
        if amount == o.amount and len(sides) == 1:
            continue
        found.append(
            Finding(
                kind="wallet_movement",
                payment_id=o.payment_id,
                merchant_id=o.merchant_id,
                details={
                    "user_id": o.user_id,
                    "version": o.version,
                    "refund_id": None if o.refund_id is None else str(o.refund_id),
                    "expected": o.amount,
                    "found": amount,
                    "wallet_versions": sorted(v for v, _ in sides),
                    "problem": _problem(o, len(sides)),
                },
            )
        )
    return found


def _problem(owed: Owed, sides: int) -> str:
    what = "refund" if owed.refund_id is not None else "payment"
    if sides == 0:
        return f"the {what} moves wallet {owed.user_id}, which holds no movement of it"
    if sides > 1:
        return f"wallet {owed.user_id} holds {sides} movements of the {what}"
    return f"wallet {owed.user_id} moved another amount than the {what} posts"
