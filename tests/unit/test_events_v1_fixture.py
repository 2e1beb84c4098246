"""Events as they were stored before events carried postings (schema version 1), written by
that code itself (commit 8ceac86's kessai/events.py) into tests/fixtures/events_v1.jsonl: they
still read, byte for byte, and fold to the same payments, balances and totals; their postings
are derived, never written back."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from kessai.events import PaymentCaptured, PaymentRefunded, event_to_json, parse_event
from kessai.ledger import PaymentState, apply, postings_of
from kessai.postings import WORLD_ACQUIRER, Posting, balances, imbalance

FIXTURE = Path(__file__).parents[1] / "fixtures" / "events_v1.jsonl"
LINES = FIXTURE.read_text().splitlines()


def test_every_stored_event_reads_and_writes_back_to_the_same_bytes() -> None:
    assert len(LINES) == 24
    for line in LINES:
        event = parse_event(line)
        assert event.schema_version == 1
        assert event.postings is None
        assert event_to_json(event).decode() == line


def test_they_fold_and_post_to_what_their_payloads_say() -> None:
    states: dict[object, PaymentState | None] = {}
    postings: list[Posting] = []
    net: dict[str, int] = defaultdict(int)
    paid_from: dict[str, int] = defaultdict(int)
    method_of: dict[object, tuple[str, str]] = {}
    for line in LINES:
        event = parse_event(line)
        before = states.get(event.payment_id)
        states[event.payment_id] = apply(before, event)
        movement = postings_of(event, before)
        assert imbalance(movement) == 0
        postings += movement
        if isinstance(event, PaymentCaptured):
            p = event.payload
            method_of[event.payment_id] = (p.method, p.user_id)
            net[event.merchant_id] += p.amount
        else:
            assert isinstance(event, PaymentRefunded)
            net[event.merchant_id] -= event.payload.amount
        method, user = method_of[event.payment_id]
        source = f"user:{user}" if method == "balance" else WORLD_ACQUIRER
        amount = event.payload.amount
        paid_from[source] -= amount if isinstance(event, PaymentCaptured) else -amount
    found = balances(postings)
    assert imbalance(postings) == 0
    for merchant, amount in net.items():
        assert found[f"merchant:{merchant}"] == amount
    for source, amount in paid_from.items():
        assert found[source] == amount
    assert set(found) == {f"merchant:{m}" for m in net} | set(paid_from)
    # And the payments themselves: every one folded, refunds within what was captured.
    assert len(states) == 12
    assert all(s is not None and s.refunded_amount <= s.captured_amount for s in states.values())
