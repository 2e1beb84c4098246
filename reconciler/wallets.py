"""The wallets and the trial balance in a run: the checks of the ledger as a whole.

After the payments are repaired (``reconciler.repair``), a run checks, for the events in its
scope (all of them in a full audit):

- the trial balance: the postings of every event (a payment's, a refund's, a top-up's; those
  of events stored before postings existed derived, ``kessai.ledger.postings_of``) sum to zero
  per currency (``trial_balance``, never repaired: the write store is the truth);
- each payment's wallet movement: a captured balance payment, and a refund of one, has its
  wallet's side in the write store, of the amount its postings say (``wallet_movement``,
  ``reconciler.movements``, never repaired);
- each wallet's chain: every movement's ``balance_after`` is the previous one plus its amount,
  never below zero, and a payment's or refund's movement is what its payment's postings say of
  that wallet (``wallet_chain``, never repaired either);
- the read side's balances: each wallet's row on the read side is its newest movement in the
  write store, its statement has every movement (``wallet_balance``), and no wallet has a
  parked event or an open dead letter.
  Repaired like a payment: the read rows of the wallet are removed under the projector's
  offset locks, every movement of the wallet is re-published, and the run waits until the
  read side matches.

Each check runs on one connection of its own at a time (no transaction spans two steps).
Wallet streams' ids are UUIDv5 (``kessai.events.wallet_stream_id``), payments' UUIDv7: the
parked events and dead letters of wallets are told apart by that, and repaired here.
Registrations' streams are UUIDv3 (``is_registration_stream``), campaigns' UUIDv8
(``reconciler.campaigns.is_campaign_stream``): neither. A grant (``RewardGranted``) is a
wallet's movement like any other here, and posts itself (``campaign:<id>`` -> ``user:<id>``),
as does its take-back (``RewardTakenBack``, ``user:<id>`` -> ``campaign:<id>``); repairing a
wallet keeps its grants' and take-backs' campaign figures as they were
(``reconciler.campaigns.compensate``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import sqlalchemy as sa

from kessai.events import (
    PaymentRefunded,
    WalletCredited,
    WalletDebited,
    parse_event,
    parse_wallet_event,
    wallet_stream_id,
)
from kessai.ledger import PaymentState, apply, postings_of
from kessai.postings import user_account
from kessai.schema import read, write
from kessai.wallets import Wallet, apply_movement, movement_of
from reconciler import campaigns, movements, totals
from reconciler.context import RunContext
from reconciler.loaders import EventRow
from reconciler.records import Finding
from reconciler.republish import republisher


def is_wallet_stream(stream_id: uuid.UUID | None) -> bool:
    return stream_id is not None and stream_id.version == 5


def is_registration_stream(stream_id: uuid.UUID | None) -> bool:
    """A registration's stream (``kessai.events.registration_stream_id``, a UUIDv3): neither a
    payment nor a wallet. The projector skips its one event and the read side shows nothing
    of it, so it is never compared or re-published as a payment; a parked event or a dead
    letter of one is reported (and left unrepaired: the run is drift)."""
    return stream_id is not None and stream_id.version == 3


@dataclass(frozen=True, slots=True)
class Head:
    version: int
    balance: int
    currency: str


async def check(
    ctx: RunContext,
    lower: uuid.UUID | None,
    in_flight: set[uuid.UUID],
    findings: list[Finding],
    *,
    dry_run: bool,
) -> list[Finding]:
    """The wallet and trial-balance findings of the run (``lower``: None, a full audit).
    A wallet with a movement still in the outbox (its stream in ``in_flight``, as the run saw
    the outbox at its start) is not judged on the read side: the relay has yet to publish it,
    exactly as for payments."""
    users = await asyncio.to_thread(ctx.in_write, lambda c: _users_since(c, lower))
    flagged = [f for f in findings if is_wallet_stream(f.payment_id)]
    users |= await asyncio.to_thread(ctx.in_read, lambda c: _users_of_streams(c, flagged))
    settled = {u for u in users if wallet_stream_id(u) not in in_flight}
    ctx.checkpoint()
    found, owed = await asyncio.to_thread(trial_balance, ctx, lower)
    found += await asyncio.to_thread(movements.unmoved, ctx, owed, lower)
    found += await asyncio.to_thread(chains, ctx, sorted(users), lower)
    ctx.checkpoint()
    wrong = await asyncio.to_thread(differing, ctx, sorted(settled))
    if wrong and ctx.settings.reconcile_confirm_seconds > 0:
        await ctx.sleep(ctx.settings.reconcile_confirm_seconds)  # projector lag is not drift
        wrong = await asyncio.to_thread(differing, ctx, sorted(wrong))
    balance_findings = [
        Finding(kind="wallet_balance", details={"user_id": user_id, **detail})
        for user_id, detail in sorted(wrong.items())
    ]
    if dry_run or not wrong:
        return found + balance_findings
    ctx.checkpoint()
    remaining = await _repair(ctx, sorted(wrong))
    marked = [
        replace(f, repaired=str((f.details or {})["user_id"]) not in remaining)
        for f in balance_findings
    ]
    return found + marked


def settle_flagged(findings: list[Finding], wallet_findings: list[Finding]) -> list[Finding]:
    """``findings`` with the parked events and dead letters of wallet streams marked repaired
    when no ``wallet_balance`` finding of theirs is left unrepaired."""
    unrepaired = {
        wallet_stream_id(str((f.details or {})["user_id"]))
        for f in wallet_findings
        if f.kind == "wallet_balance" and not f.repaired
    }
    return [
        replace(f, repaired=f.payment_id not in unrepaired)
        if is_wallet_stream(f.payment_id) and f.kind in ("parked", "dead_letter")
        else f
        for f in findings
    ]


# -- what the write store says -----------------------------------------------------------------


def _users_since(conn: sa.Connection, lower: uuid.UUID | None) -> set[str]:
    w = write.wallet_events.c
    query = sa.select(w.user_id).distinct()
    if lower is not None:
        query = query.where(w.event_id >= lower)
    return set(conn.execute(query).scalars())


def _users_of_streams(conn: sa.Connection, flagged: list[Finding]) -> set[str]:
    """The users of the wallet streams in ``flagged``: by the read row of the wallet, else by
    the parked event's or the dead letter's own body."""
    streams = sorted({f.payment_id for f in flagged if f.payment_id is not None})
    if not streams:
        return set()
    wr, pe, dl = read.wallets.c, read.parked_events.c, read.dead_letters.c
    users: dict[uuid.UUID, str] = dict(
        conn.execute(sa.select(wr.stream_id, wr.user_id).where(wr.stream_id.in_(streams))).all()
    )
    bodies = conn.execute(sa.select(pe.payment_id, pe.body).where(pe.payment_id.in_(streams)))
    raw = conn.execute(sa.select(dl.payment_id, dl.raw_value).where(dl.payment_id.in_(streams)))
    for stream_id, body in [*bodies, *raw]:
        user_id = _user_in(body)
        if stream_id not in users and user_id and wallet_stream_id(user_id) == stream_id:
            users[stream_id] = user_id
    return set(users.values())


def _user_in(body: str | bytes | None) -> str | None:
    try:
        user_id = orjson.loads(body or b"").get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return user_id if isinstance(user_id, str) else None


def trial_balance(
    ctx: RunContext, lower: uuid.UUID | None
) -> tuple[list[Finding], list[movements.Owed]]:
    """The postings of the events in scope, summed per currency: a finding per currency whose
    sum is not zero (an event whose own postings do not balance does not even parse: it is
    the projector's dead letter and the payments' finding); and, collected on the way, the
    wallet movements the payment events in scope owe (``movements.owed_by``)."""
    e, w = write.events.c, write.wallet_events.c
    total: dict[str, int] = defaultdict(int)
    owed: list[movements.Owed] = []
    with ctx.write.connect() as conn:
        query = sa.select(e.payment_id, e.version, e.body).order_by(e.payment_id, e.version)
        if lower is not None:
            query = query.where(e.event_id >= lower)
        previous: dict[uuid.UUID, PaymentState | None] = {}
        for payment_id, version, body in conn.execute(query):
            event = parse_event(body)
            before = previous.get(payment_id)
            if before is None and version > 1:  # its payment began before the scope
                before = _state_before(conn, payment_id, version)
            previous[payment_id] = apply(before, event)
            for posting in postings_of(event, before):
                total[event.payload.currency] += posting.amount
            owed += movements.owed_by(event)
        # The wallet movements that post themselves: top-ups, grants and their take-backs.
        posting_itself = ("TopUpReceived", "RewardGranted", "RewardTakenBack")
        topups = sa.select(w.body).where(w.event_type.in_(posting_itself))
        if lower is not None:
            topups = topups.where(w.event_id >= lower)
        for (body,) in conn.execute(topups):
            moved = parse_wallet_event(body)
            for posting in moved.postings or ():
                total[moved.payload.currency] += posting.amount
    return [
        Finding(kind="trial_balance", details={"currency": currency, "sum": amount})
        for currency, amount in sorted(total.items())
        if amount != 0
    ], owed


def _state_before(conn: sa.Connection, payment_id: uuid.UUID, version: int) -> PaymentState | None:
    e = write.events.c
    state: PaymentState | None = None
    rows = conn.execute(
        sa.select(e.body).where(e.payment_id == payment_id, e.version < version).order_by(e.version)
    )
    for (body,) in rows:
        state = apply(state, parse_event(body))
    return state


def chains(ctx: RunContext, users: Sequence[str], lower: uuid.UUID | None) -> list[Finding]:
    """Each wallet's movements in scope (and the one before them) against each other and
    against the postings of their payments."""
    found: list[Finding] = []
    w = write.wallet_events.c
    size = ctx.settings.reconcile_chunk_size
    with ctx.write.connect() as conn:
        for first in range(0, len(users), size):
            chunk = list(users[first : first + size])
            starts = dict.fromkeys(chunk, 1)
            if lower is not None:
                starts.update(
                    conn.execute(
                        sa.select(w.user_id, sa.func.min(w.version))
                        .where(w.user_id.in_(chunk), w.event_id >= lower)
                        .group_by(w.user_id)
                    ).all()
                )
            rows = conn.execute(
                sa.select(w.user_id, w.version, w.amount, w.balance_after, w.body)
                .where(
                    sa.or_(
                        *(sa.and_(w.user_id == u, w.version >= v - 1) for u, v in starts.items())
                    )
                )
                .order_by(w.user_id, w.version)
            ).all()
            found += _check_chains(conn, rows)
    return found


def _check_chains(conn: sa.Connection, rows: Sequence[Any]) -> list[Finding]:
    found: list[Finding] = []
    wallets: dict[str, Wallet] = {}
    sides: list[WalletDebited | WalletCredited] = []
    for user_id, version, amount, balance_after, body in rows:
        event = parse_wallet_event(body)
        movement = movement_of(event)
        wallet = wallets.get(user_id)
        if wallet is None:  # the first movement loaded: the chain is checked from here on
            wallet = Wallet(
                user_id, movement.currency, movement.balance_after - movement.amount, version - 1
            )
        problem = None
        if (amount, balance_after) != (movement.amount, movement.balance_after):
            problem = f"columns say {amount:+d} to {balance_after}, the body {movement.amount:+d}"
        else:
            try:
                wallets[user_id] = apply_movement(wallet, movement)
            except ValueError as broken:
                problem = str(broken)
        if problem is not None:
            found.append(_broken(user_id, version, wallet, movement.amount, balance_after, problem))
            wallets[user_id] = Wallet(user_id, movement.currency, balance_after, version)
        elif isinstance(event, WalletDebited | WalletCredited):
            sides.append(event)
    return found + _sides_match_payments(conn, sides)


def _broken(
    user_id: str, version: int, wallet: Wallet, amount: int, after: int, why: str
) -> Finding:
    return Finding(
        kind="wallet_chain",
        details={
            "user_id": user_id,
            "version": version,
            "balance_before": wallet.balance,
            "amount": amount,
            "balance_after": after,
            "problem": why,
        },
    )


def _sides_match_payments(
    conn: sa.Connection, sides: list[WalletDebited | WalletCredited]
) -> list[Finding]:
    """A wallet's debit (credit) is what its payment's capture (refund) posts to that wallet."""
    if not sides:
        return []
    e = write.events.c
    payment_ids = sorted({s.payload.payment_id for s in sides})
    posted: dict[tuple[uuid.UUID, uuid.UUID | None], int] = {}
    states: dict[uuid.UUID, PaymentState | None] = {}
    rows = conn.execute(
        sa.select(e.payment_id, e.body)
        .where(e.payment_id.in_(payment_ids))
        .order_by(e.payment_id, e.version)
    )
    for payment_id, body in rows:
        event = parse_event(body)
        before = states.get(payment_id)
        states[payment_id] = apply(before, event)
        refund_id = event.payload.refund_id if isinstance(event, PaymentRefunded) else None
        user = before.user_id if before is not None else event.payload.user_id  # type: ignore[union-attr]
        posted[(payment_id, refund_id)] = sum(
            p.amount for p in postings_of(event, before) if p.account == user_account(user)
        )
    found = []
    for side in sides:
        refund_id = side.payload.refund_id if isinstance(side, WalletCredited) else None
        moved = movement_of(side).amount
        says = posted.get((side.payload.payment_id, refund_id))
        if says != moved:
            found.append(
                Finding(
                    kind="wallet_chain",
                    payment_id=side.payload.payment_id,
                    merchant_id=side.payload.merchant_id,
                    details={
                        "user_id": side.user_id,
                        "version": side.version,
                        "amount": moved,
                        "posted": says,
                        "problem": "the wallet moved what its payment does not post",
                    },
                )
            )
    return found


# -- the read side -----------------------------------------------------------------------------


def heads(conn: sa.Connection, users: Sequence[str]) -> dict[str, Head]:
    rows = conn.execute(write.newest_wallet_movements(users))
    return {
        user_id: Head(version, balance, currency) for user_id, version, currency, balance in rows
    }


def differing(ctx: RunContext, users: Sequence[str]) -> dict[str, dict[str, object]]:
    """The wallets among ``users`` whose read row is not their newest movement in the write
    store, whose statement lacks a line (fewer movements than its version), or that have a
    parked event or an open dead letter: what each side says."""
    wrong: dict[str, dict[str, object]] = {}
    size = ctx.settings.reconcile_chunk_size
    wr, wm = read.wallets.c, read.wallet_movements.c
    pe, dl = read.parked_events.c, read.dead_letters.c
    for first in range(0, len(users), size):
        chunk = list(users[first : first + size])
        truth = ctx.in_write(lambda c, chunk=chunk: heads(c, chunk))  # type: ignore[misc]
        streams = {wallet_stream_id(u): u for u in chunk}
        with ctx.read.connect() as conn:
            shown = {
                u: Head(v, b, c)
                for u, v, b, c in conn.execute(
                    sa.select(wr.user_id, wr.version, wr.balance, wr.currency).where(
                        wr.user_id.in_(chunk)
                    )
                )
            }
            lines: dict[str, int] = dict(
                conn.execute(
                    sa.select(wm.user_id, sa.func.count())
                    .where(wm.user_id.in_(chunk))
                    .group_by(wm.user_id)
                ).all()
            )
            stuck = set(
                conn.execute(sa.select(pe.payment_id).where(pe.payment_id.in_(streams)))
                .scalars()
                .all()
            ) | set(
                conn.execute(
                    sa.select(dl.payment_id).where(dl.payment_id.in_(streams), dl.status == "open")
                )
                .scalars()
                .all()
            )
        for user_id in chunk:
            right, seen = truth.get(user_id), shown.get(user_id)
            complete = lines.get(user_id, 0) == (0 if right is None else right.version)
            if right != seen or not complete or wallet_stream_id(user_id) in stuck:
                wrong[user_id] = {
                    "write_balance": None if right is None else right.balance,
                    "read_balance": None if seen is None else seen.balance,
                    "write_version": None if right is None else right.version,
                    "read_version": None if seen is None else seen.version,
                    "currency": next((h.currency for h in (right, seen) if h), None),
                    "statement_lines": lines.get(user_id, 0),
                }
    return wrong


async def _repair(ctx: RunContext, users: list[str]) -> set[str]:
    """Remove the wallets' read rows, re-publish every movement of theirs, wait until the read
    side matches; the users still wrong when the wait ran out."""
    rows = await asyncio.to_thread(ctx.in_write, lambda c: _bodies(c, users))
    async with republisher(ctx.settings) as send:
        await asyncio.to_thread(_delete_read_rows, ctx, users, rows)
        await send(rows)
    return await ctx.wait_until_right(users, lambda keys: differing(ctx, keys))


def _bodies(conn: sa.Connection, users: list[str]) -> list[EventRow]:
    """Every movement of the wallets, as rows to re-publish (keyed by the wallet's stream)."""
    w = write.wallet_events.c
    rows = conn.execute(
        sa.select(w.user_id, w.version, w.event_id, w.event_type, w.schema_version, w.body)
        .where(w.user_id.in_(users))
        .order_by(w.user_id, w.version)
    )
    return [(wallet_stream_id(u), v, i, t, s, b) for u, v, i, t, s, b in rows]


def _delete_read_rows(ctx: RunContext, users: list[str], republished: list[EventRow]) -> None:
    """The wallets' read rows, removed in one transaction under the projector's offset locks
    (no projector batch interleaves): the re-published movements rebuild them from version 1.
    Their grants' campaign figures are compensated in the same transaction."""
    with ctx.read.begin() as conn:
        totals.lock_projector(conn, ctx.settings.topic)
        campaigns.compensate(conn, republished)
        conn.execute(
            read.wallet_movements.delete().where(read.wallet_movements.c.user_id.in_(users))
        )
        conn.execute(read.wallets.delete().where(read.wallets.c.user_id.in_(users)))
