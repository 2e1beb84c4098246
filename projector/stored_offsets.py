"""The projector's offset rows (``projector_offsets``): what a batch stores after itself, and
the short transactions on them outside batches.

The batch transaction (``projector.service``) stores ``offsets_after`` its batch. Every other
function here begins and commits its own transaction; each locks the rows it reads, so a
consumer never overwrites a position another one moved.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Engine

from kessai import offsets
from kessai.clock import utcnow
from projector.apply import Changes, DecodedBatch


def offsets_after(
    batch: DecodedBatch,
    stored: dict[int, offsets.OffsetRow],
    changes: Changes,
    caught_up: set[int],
    now: datetime,
) -> dict[int, offsets.OffsetRow]:
    """The rows to store for each partition of ``batch`` once it is applied: the next offset,
    the last record's event id, the newest event time seen, and the caught-up stamp."""
    rows = {}
    for p in sorted({r.partition for r in batch.records}):
        last = max((r for r in batch.records if r.partition == p), key=lambda r: r.offset)
        previous = stored.get(p)
        last_event_at = changes.last_event_at.get(p)
        if previous is not None and previous.last_event_at is not None:
            last_event_at = max(filter(None, (last_event_at, previous.last_event_at)))
        rows[p] = offsets.OffsetRow(
            next_offset=last.offset + 1,
            last_event_id=dict(last.headers).get("event_id", b"").decode() or None,
            last_event_at=last_event_at,
            caught_up_at=now
            if p in caught_up
            else (previous.caught_up_at if previous is not None else None),
        )
    return rows


def read(engine: Engine, topic: str, partitions: list[int]) -> dict[int, offsets.OffsetRow]:
    """The stored rows of ``partitions`` (one short transaction)."""
    with engine.begin() as conn:
        return offsets.lock_offsets(conn, topic, partitions)


def rewind(
    engine: Engine, topic: str, partition: int, row: offsets.OffsetRow, position: int
) -> int:
    """Store ``position`` for a reset partition (one transaction); returns the stored position,
    which is another consumer's if it moved the row first (its batches verified their own)."""
    with engine.begin() as conn:
        current = offsets.lock_offsets(conn, topic, [partition]).get(partition)
        if current is None or current.next_offset != row.next_offset:
            return current.next_offset if current is not None else position
        offsets.save_offsets(
            conn,
            topic,
            {partition: offsets.OffsetRow(position, None, row.last_event_at, row.caught_up_at)},
            utcnow(),
        )
    return position


def stamp_caught_up(engine: Engine, topic: str, positions: dict[int, int | None]) -> None:
    """Record that each partition was found at the end of its log at ``positions`` (one
    transaction); a partition whose row moved on since is left alone."""
    now = utcnow()
    with engine.begin() as conn:
        stored = offsets.lock_offsets(conn, topic, positions)
        fresh = {}
        for p, position in positions.items():
            row = stored.get(p)
            if position is None and row is None:
                fresh[p] = offsets.OffsetRow(0, None, None, now)
            elif row is not None and row.next_offset == position:
                fresh[p] = offsets.OffsetRow(
                    row.next_offset, row.last_event_id, row.last_event_at, now
                )
        offsets.save_offsets(conn, topic, fresh, now)
