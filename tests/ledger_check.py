"""The trial balance of a test's write store, checked when the test ends (``write_db_url``):
every event's postings balance, and an event that carries postings carries the ones its payload
(and, for a refund, its payment) say; each wallet's chain of ``balance_after`` adds up and never
goes below zero, and ends where the postings to its account (since wallets exist) add up to. So
every test that writes money enforces the ledger."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable

import sqlalchemy as sa

from kessai.db import create_db_engine
from kessai.events import (
    RewardGranted,
    RewardTakenBack,
    TopUpReceived,
    parse_event,
    parse_wallet_event,
)
from kessai.ledger import PaymentState, apply, derived_postings, postings_of
from kessai.postings import Posting, imbalance, kind_of
from kessai.schema.write import events, wallet_events
from kessai.wallets import Wallet, apply_movement, movement_of


def ledger_problems(url: str) -> list[str]:
    """What is wrong with the postings of the events stored at ``url``; empty when nothing is.
    A store whose events cannot be parsed or folded is another test's subject: those are left
    to it (the reconciler's and the projector's tests store such events on purpose)."""
    engine = create_db_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(events.c.payment_id, events.c.body).order_by(
                    events.c.payment_id, events.c.version
                )
            ).all()
            movements = conn.execute(
                sa.select(wallet_events.c.user_id, wallet_events.c.body).order_by(
                    wallet_events.c.user_id, wallet_events.c.version
                )
            ).all()
    finally:
        engine.dispose()
    problems: list[str] = []
    total: dict[str, int] = defaultdict(int)
    posted_to_wallets: dict[str, int] = defaultdict(int)
    wallets: dict[str, Wallet] = {}
    unreadable: set[str] = set()
    for user_id, body in movements:
        try:
            movement = parse_wallet_event(body)
        except ValueError:  # stored raw on purpose (the store's own tests): theirs to judge
            unreadable.add(user_id)
            continue
        if user_id in unreadable:
            continue
        wallet = wallets.get(user_id, Wallet.empty(user_id))
        try:
            wallets[user_id] = apply_movement(wallet, movement_of(movement))
        except ValueError as broken:
            problems.append(str(broken))
            continue
        # A top-up, a grant and its take-back post themselves (from outside, from a campaign's
        # budget, back to it).
        posts_itself = TopUpReceived | RewardGranted | RewardTakenBack
        if isinstance(movement, posts_itself) and movement.postings is not None:
            if imbalance(movement.postings) != 0:
                problems.append(
                    f"{movement.event_id}: postings sum to {imbalance(movement.postings)}"
                )
            total[movement.payload.currency] += imbalance(movement.postings)
            _add_wallet_postings(posted_to_wallets, movement.postings)
    state: dict[uuid.UUID, PaymentState | None] = {}
    for payment_id, body in rows:
        try:
            event = parse_event(body)
            before = state.get(payment_id)
            state[payment_id] = apply(before, event)
        except ValueError:
            continue
        postings = postings_of(event, before)
        if imbalance(postings) != 0:
            problems.append(f"{event.event_id}: postings sum to {imbalance(postings)}")
        if event.postings is not None and event.postings != derived_postings(event, before):
            problems.append(
                f"{event.event_id}: carries {event.postings}, "
                f"its payload says {derived_postings(event, before)}"
            )
        total[event.payload.currency] += imbalance(postings)
        if event.postings is not None:  # written since wallets exist: its wallet moved too
            _add_wallet_postings(posted_to_wallets, event.postings)
    problems += [f"trial balance in {c}: {s}, not 0" for c, s in total.items() if s != 0]
    for user_id, posted in posted_to_wallets.items():
        if user_id in unreadable:
            continue
        held = wallets.get(user_id, Wallet.empty(user_id)).balance
        if posted != held:
            problems.append(f"wallet {user_id} holds {held}; its postings add up to {posted}")
    return problems


def _add_wallet_postings(posted: dict[str, int], postings: Iterable[Posting]) -> None:
    for posting in postings:
        if kind_of(posting.account) == "user":
            posted[posting.account.partition(":")[2]] += posting.amount
