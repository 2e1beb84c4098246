"""The projector's stored positions in the read database, one row per topic partition.

Every writer of projected rows takes these row locks first: each projector batch (its own
partitions), a dead-letter retry (its payment's partition), the reconciler's repairs (all of
them). That is what keeps those writers from interleaving on the same payments and totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from kessai.db import upsert
from kessai.schema.read import projector_offsets


@dataclass(frozen=True, slots=True)
class OffsetRow:
    next_offset: int
    last_event_id: str | None
    last_event_at: datetime | None
    caught_up_at: datetime | None


def lock_offsets(
    conn: sa.Connection, topic: str, partitions: Iterable[int]
) -> dict[int, OffsetRow]:
    """The stored positions of ``partitions``, locked until the transaction ends (MySQL), so
    two consumers that both believe they own a partition cannot both apply its records."""
    rows = conn.execute(
        sa.select(
            projector_offsets.c.kafka_partition,
            projector_offsets.c.next_offset,
            projector_offsets.c.last_event_id,
            projector_offsets.c.last_event_at,
            projector_offsets.c.caught_up_at,
        )
        .where(
            projector_offsets.c.topic == topic,
            projector_offsets.c.kafka_partition.in_(sorted(partitions)),
        )
        .order_by(projector_offsets.c.kafka_partition)
        .with_for_update()
    )
    return {p: OffsetRow(n, event_id, last, caught) for p, n, event_id, last, caught in rows}


def save_offsets(
    conn: sa.Connection, topic: str, offsets: dict[int, OffsetRow], now: datetime
) -> None:
    upsert(
        conn,
        projector_offsets,
        [
            {
                "topic": topic,
                "kafka_partition": p,
                "next_offset": row.next_offset,
                "last_event_id": row.last_event_id,
                "last_event_at": row.last_event_at,
                "caught_up_at": row.caught_up_at,
                "updated_at": now,
            }
            for p, row in sorted(offsets.items())
        ],
        replace=("next_offset", "last_event_id", "last_event_at", "caught_up_at", "updated_at"),
    )
