"""The projector's decisions about campaigns and grants, without I/O: a campaign's row as its
events leave it, its figures as its grants add to them and its take-backs take out (once), and
the stream rules (duplicates, gaps, wrong keys, events that cannot follow) for campaign
streams."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kessai.campaigns import (
    CampaignChange,
    CampaignChanged,
    apply_campaign_event,
    campaign_stream_id,
    decide_change,
    decide_stop,
    fold_campaign,
)
from kessai.events import RewardGranted, kafka_key, wallet_stream_id
from kessai.grants import decide_exhausted
from kessai.ids import new_id
from projector.apply import Changes, Record, Snapshot, apply_batch
from projector.campaign_rows import minute_of
from tests.unit.test_projector_apply import zone_of
from tests.wallet_streams import (
    T0,
    AnyEvent,
    created,
    granted,
    record_parts,
    taken_back,
    wallet_history,
)

STREAM = campaign_stream_id("camp-1")


def as_record(event: AnyEvent, offset: int = 0, *, key: bytes | None = None) -> Record:
    own_key, value, headers = record_parts(event)
    return Record("t", 0, offset, key=own_key if key is None else key, value=value,
                  headers=tuple(headers))  # fmt: skip


def run(events: list[AnyEvent], snapshot: Snapshot | None = None) -> Changes:
    records = [as_record(e, i) for i, e in enumerate(events)]
    return apply_batch(records, snapshot or Snapshot(), zone_of)


def carried(changes: Changes) -> Snapshot:
    """What the next batch finds in the read model after ``changes``."""
    return Snapshot(
        wallets=dict(changes.wallets),
        campaigns=dict(changes.campaigns),
        parked=dict(changes.parked),
    )


def campaign_life() -> list[AnyEvent]:
    """Created, its end and budget raised, stopped, then exhausted (by grants decided before
    the stop): versions 1-4."""
    creation = created(budget=5_000)
    state = fold_campaign([creation])
    later = T0 + timedelta(hours=2)
    change = decide_change(
        state,
        CampaignChange(ends_at=T0 + timedelta(days=20), budget=8_000),
        granted=0,
        now=later,
        actor="admin-key",
    )
    state = apply_campaign_event(state, change)
    stop = decide_stop(state, now=later + timedelta(minutes=30), actor="admin-key")
    state = apply_campaign_event(state, stop)
    exhausted = decide_exhausted(state, granted=8_000, now=later + timedelta(hours=1), actor="r")
    assert exhausted is not None
    return [creation, change, stop, exhausted]


def test_a_campaign_row_is_the_fold_of_its_events() -> None:
    life = campaign_life()
    changes = run(life)
    row = changes.campaigns[STREAM]
    assert row.state == fold_campaign(life)  # type: ignore[arg-type]
    assert (row.state.version, row.state.rules.budget) == (4, 8_000)
    assert row.state.rules.ends_at == T0 + timedelta(days=20)
    assert row.state.stopped_at == T0 + timedelta(hours=2, minutes=30)
    assert row.state.exhausted_at == T0 + timedelta(hours=3)
    assert row.updated_at == life[-1].occurred_at
    assert changes.applied == 4
    assert not changes.dead_letters
    assert not changes.wallets
    assert not changes.campaign_totals  # a campaign's own events grant nothing


def test_campaign_events_out_of_order_are_parked_and_duplicates_change_nothing() -> None:
    one, two, three, four = campaign_life()
    first = run([one, three, four])
    assert first.campaigns[STREAM].state.version == 1
    assert {key: p.reason for key, p in first.parked.items()} == {
        (STREAM, 3): "gap",
        (STREAM, 4): "gap",
    }
    second = run([two, one], carried(first))
    assert second.unparked == {(STREAM, 3), (STREAM, 4)}
    assert second.campaigns[STREAM].state.version == 4
    assert (second.applied, second.duplicates) == (3, 1)
    again = run([one, two, three, four], carried(second))
    assert (again.applied, again.duplicates, again.campaigns) == (0, 4, {})


def test_a_campaign_event_under_another_key_is_a_dead_letter() -> None:
    creation = created()
    for wrong in (campaign_stream_id("camp-2"), wallet_stream_id("u1")):
        changes = apply_batch([as_record(creation, key=kafka_key(wrong))], Snapshot(), zone_of)
        (letter,) = changes.dead_letters
        assert letter.reason == "record key is not the campaign stream of the event's campaign_id"
        assert changes.campaigns == {}


def test_a_change_the_rules_refuse_is_a_dead_letter_that_blocks_the_campaign() -> None:
    creation = created()
    # A change to an end before the start: the write side never decides it.
    broken = CampaignChanged(
        event_id=creation.event_id,
        campaign_id="camp-1",
        version=2,
        occurred_at=T0,
        recorded_at=T0,
        actor="admin-key",
        payload=CampaignChange(ends_at=T0 - timedelta(days=1)),
    )
    stop = decide_stop(fold_campaign([creation]), now=T0, actor="admin-key")
    stop = stop.model_copy(update={"version": 3})
    changes = run([creation, broken, stop])
    (letter,) = changes.dead_letters
    assert (letter.payment_id, letter.version, letter.status) == (STREAM, 2, "open")
    assert letter.reason.startswith("ledger invariant broken: campaign camp-1")
    assert changes.parked[(STREAM, 3)].reason == "blocked"
    assert changes.campaigns[STREAM].state.version == 1


def test_grants_add_to_their_campaigns_figures_once_in_all_and_per_minute() -> None:
    at = datetime(2026, 12, 2, 9, 0, 30, tzinfo=UTC)
    alice = wallet_history("alice", [("bonus", 500), ("payment", 300), ("cashback", 60)], start=at)
    bob = wallet_history("bob", [("top_up", 1_000), ("bonus", 500)], start=at, campaign_id="b")
    first = run([created(), *alice, *bob])
    assert {c: (d.granted_amount, d.grants_count) for c, d in first.campaign_totals.items()} == {
        "camp-1": (560, 2),
        "b": (500, 1),
    }
    minutes = {k: (d.granted_amount, d.grants_count) for k, d in first.campaign_minutes.items()}
    assert minutes == {
        ("camp-1", datetime(2026, 12, 2, 9, 1, tzinfo=UTC)): (500, 1),
        ("camp-1", datetime(2026, 12, 2, 9, 3, tzinfo=UTC)): (60, 1),
        ("b", datetime(2026, 12, 2, 9, 2, tzinfo=UTC)): (500, 1),
    }
    lines = {(m.user_id, m.version): (m.kind, m.campaign_id) for m in first.movements}
    assert lines[("alice", 1)] == ("reward", "camp-1")
    assert lines[("alice", 2)] == ("payment", None)
    assert lines[("alice", 3)] == ("reward", "camp-1")
    cashback = next(m for m in first.movements if (m.user_id, m.version) == ("alice", 3))
    assert cashback.payment_id == alice[1].payload.payment_id
    # Redelivered and replayed: duplicates of the wallets' versions, nothing added again.
    again = run([*alice, *bob, *alice], carried(first))
    assert again.campaign_totals == {}
    assert again.campaign_minutes == {}
    assert again.duplicates == 2 * len(alice) + len(bob)


def test_a_grant_parked_behind_a_gap_counts_when_it_is_applied_not_before() -> None:
    bonus, payment, cashback = wallet_history(
        "alice", [("bonus", 500), ("payment", 300), ("cashback", 60)]
    )
    first = run([bonus, cashback])
    assert {c: d.granted_amount for c, d in first.campaign_totals.items()} == {"camp-1": 500}
    assert (wallet_stream_id("alice"), 3) in first.parked
    second = run([payment, cashback], carried(first))
    assert {c: d.granted_amount for c, d in second.campaign_totals.items()} == {"camp-1": 60}
    assert second.duplicates == 1


def test_a_grant_whose_balance_does_not_add_up_is_a_dead_letter_and_counts_nothing() -> None:
    broken = granted("alice", 500, balance_after=900, version=1)
    changes = run([broken])
    (letter,) = changes.dead_letters
    assert "ledger invariant broken" in letter.reason
    assert changes.campaign_totals == {}
    assert changes.movements == []


def test_a_minute_is_the_utc_minute_whatever_the_offset() -> None:
    tokyo = datetime.fromisoformat("2026-12-02T18:59:59.999999+09:00")
    assert minute_of(tokyo) == datetime(2026, 12, 2, 9, 59, tzinfo=UTC)


def test_a_take_back_takes_what_came_back_out_of_its_campaigns_figures_once() -> None:
    """A cashback of 200, then its refund's take-back of 150 (50 owed): the campaign's figures
    are net of it (its grant still counted once), the statement line names the campaign, the
    payment and the refund, and a redelivery takes nothing out again."""
    at = datetime(2026, 12, 2, 9, 0, 30, tzinfo=UTC)
    steps = [("top_up", 100), ("payment", 50), ("cashback", 200)]
    alice = wallet_history("alice", steps, start=at)
    payment_id, refund_id = alice[2].payload.payment_id, new_id()
    assert payment_id is not None
    back = at + timedelta(minutes=4)
    cashback = alice[2]
    assert isinstance(cashback, RewardGranted)
    taken = taken_back(
        cashback, 150, owed=50, balance_after=100, version=4, at=back, refund_id=refund_id
    )
    first = run([*alice, taken])
    assert {c: (d.granted_amount, d.grants_count) for c, d in first.campaign_totals.items()} == {
        "camp-1": (50, 1)
    }
    minutes = {k: (d.granted_amount, d.grants_count) for k, d in first.campaign_minutes.items()}
    assert minutes == {
        ("camp-1", datetime(2026, 12, 2, 9, 3, tzinfo=UTC)): (200, 1),
        ("camp-1", datetime(2026, 12, 2, 9, 4, tzinfo=UTC)): (-150, 0),
    }
    line = next(m for m in first.movements if m.version == 4)
    assert (line.kind, line.amount, line.balance_after) == ("reward_takeback", -150, 100)
    assert (line.campaign_id, line.payment_id, line.refund_id) == ("camp-1", payment_id, refund_id)
    again = run([taken], carried(first))
    assert again.campaign_totals == {}
    assert again.duplicates == 1
