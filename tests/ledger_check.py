"""The trial balance of a test's write store, checked when the test ends (``write_db_url``):
every event's postings balance, and an event that carries postings carries the ones its payload
(and, for a refund, its payment) say. So every test that writes money enforces the ledger."""

from __future__ import annotations

import uuid
from collections import defaultdict

import sqlalchemy as sa

from kessai.db import create_db_engine
from kessai.events import parse_event
from kessai.ledger import PaymentState, apply, derived_postings, postings_of
from kessai.postings import imbalance
from kessai.schema.write import events


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
    finally:
        engine.dispose()
    problems: list[str] = []
    total: dict[str, int] = defaultdict(int)
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
    problems += [f"trial balance in {c}: {s}, not 0" for c, s in total.items() if s != 0]
    return problems
