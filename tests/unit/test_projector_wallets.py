"""The projector's decisions about wallet events, without I/O: balances and statement lines,
duplicates, gaps, keys that do not name the wallet, and events that break the wallet's rule."""

from __future__ import annotations

import uuid

from kessai.events import kafka_key, wallet_stream_id
from kessai.ids import new_id
from projector.apply import Changes, Record, Snapshot, apply_batch
from tests.unit.test_projector_apply import captured, record, zone_of
from tests.wallet_streams import WalletEvent, record_parts, wallet_history

STREAM = wallet_stream_id("u1")


def wallet_record(event: WalletEvent, offset: int = 0, *, key: bytes | None = None) -> Record:
    own_key, value, headers = record_parts(event)
    return Record("t", 0, offset, key=own_key if key is None else key, value=value,
                  headers=tuple(headers))  # fmt: skip


def run(events: list[WalletEvent], snapshot: Snapshot | None = None) -> Changes:
    records = [wallet_record(e, i) for i, e in enumerate(events)]
    return apply_batch(records, snapshot or Snapshot(), zone_of)


def carried(changes: Changes) -> Snapshot:
    """What the next batch finds in the read model after ``changes``."""
    return Snapshot(wallets=dict(changes.wallets), parked=dict(changes.parked))


def test_a_top_up_a_payment_and_its_refund_give_the_balance_and_three_statement_lines() -> None:
    history = wallet_history("u1", [("top_up", 10_000), ("payment", 1_200), ("refund", 200)])
    changes = run(history)
    wallet = changes.wallets[STREAM]
    assert (wallet.wallet.balance, wallet.wallet.currency, wallet.wallet.version) == (
        9_000,
        "JPY",
        3,
    )
    lines = [(m.version, m.kind, m.amount, m.balance_after) for m in changes.movements]
    assert lines == [(1, "top_up", 10_000, 10_000), (2, "payment", -1_200, 8_800),
                     (3, "refund", 200, 9_000)]  # fmt: skip
    top_up, payment, refund = changes.movements
    assert (top_up.source, top_up.reference, top_up.payment_id) == ("bank", "ref-1", None)
    assert payment.merchant_id == "shop-1"
    assert payment.payment_id == refund.payment_id
    assert refund.refund_id is not None
    assert payment.refund_id is None
    assert not changes.daily  # the payment's own event counts in the merchant's totals


def test_wallet_events_beside_payment_events_touch_neither_the_other() -> None:
    pid = new_id()
    history = wallet_history("u1", [("top_up", 500)])
    records = [record(captured(pid), 0), wallet_record(history[0], 1)]
    changes = apply_batch(records, Snapshot(), zone_of)
    assert changes.applied == 2
    assert set(changes.payments) == {pid}
    assert set(changes.wallets) == {STREAM}


def test_a_redelivered_or_replayed_movement_changes_nothing() -> None:
    history = wallet_history("u1", [("top_up", 1_000), ("payment", 300)])
    first = run(history)
    again = run([*history, history[0]], carried(first))
    assert (again.applied, again.duplicates) == (0, 3)
    assert again.wallets == {}
    assert again.movements == []


def test_a_gap_is_parked_until_the_missing_version_arrives() -> None:
    one, two, three = wallet_history("u1", [("top_up", 1_000), ("payment", 300), ("refund", 100)])
    first = run([one, three])
    assert first.wallets[STREAM].wallet.version == 1
    assert set(first.parked) == {(STREAM, 3)}
    assert first.parked[(STREAM, 3)].reason == "gap"
    second = run([two], carried(first))
    assert second.unparked == {(STREAM, 3)}
    assert second.wallets[STREAM].wallet.balance == 800
    assert [m.version for m in second.movements] == [2, 3]


def test_a_record_keyed_by_another_stream_is_a_dead_letter() -> None:
    (top_up,) = wallet_history("u1", [("top_up", 1_000)])
    for wrong in (kafka_key(wallet_stream_id("u2")), kafka_key(uuid.uuid4())):
        changes = apply_batch([wallet_record(top_up, key=wrong)], Snapshot(), zone_of)
        assert changes.applied == 0
        assert changes.wallets == {}
        (letter,) = changes.dead_letters
        assert letter.reason == "record key is not the wallet stream of the event's user_id"


def test_a_balance_that_does_not_add_up_is_a_dead_letter_and_blocks_the_wallet() -> None:
    one, two, three = wallet_history("u1", [("top_up", 1_000), ("payment", 300), ("refund", 100)])
    broken = two.model_copy(
        update={"payload": two.payload.model_copy(update={"balance_after": 5_000})}
    )
    changes = run([one, broken, three])
    (letter,) = changes.dead_letters
    assert (letter.payment_id, letter.version, letter.status) == (STREAM, 2, "open")
    assert "ledger invariant broken" in letter.reason
    assert changes.parked[(STREAM, 3)].reason == "blocked"
    # The right version 2 (re-published from the write store) supersedes it.
    fixed = run([two], Snapshot(wallets=dict(changes.wallets), parked=dict(changes.parked),
                                dead_lettered={STREAM: {2}}))  # fmt: skip
    assert fixed.resolved == {(STREAM, 2)}
    assert fixed.wallets[STREAM].wallet.balance == 800
