"""Operating the dead letters: list them, and retry them through the projector's own path.

A retry re-decodes the stored raw record and applies it exactly as the batch loop would, inside
a transaction that holds the lock on its partition's offset row (the lock every batch of that
partition takes first), so it never races the running projector over the same payment. If the
record now applies (a newer projector understands it, or the write side's correct event was
re-published meanwhile), the dead letter is resolved and the payment's parked successors are
applied behind it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai import offsets
from kessai.clock import utcnow
from kessai.schema.read import dead_letters
from projector import repository
from projector.apply import Record, apply_batch


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    dead_letter_id: int
    payment_id: uuid.UUID | None
    version: int | None
    topic: str
    partition: int
    offset: int
    reason: str
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    dead_letter_id: int
    resolved: bool
    reason: str


def list_dead_letters(
    engine: Engine, *, status: str | None = "open", limit: int = 100
) -> list[DeadLetterView]:
    query = sa.select(
        dead_letters.c.dead_letter_id,
        dead_letters.c.payment_id,
        dead_letters.c.version,
        dead_letters.c.topic,
        dead_letters.c.kafka_partition,
        dead_letters.c.kafka_offset,
        dead_letters.c.reason,
        dead_letters.c.status,
        dead_letters.c.created_at,
    ).order_by(dead_letters.c.dead_letter_id)
    if status is not None:
        query = query.where(dead_letters.c.status == status)
    with engine.connect() as conn:
        return [DeadLetterView(*row) for row in conn.execute(query.limit(limit))]


def retry_dead_letter(engine: Engine, dead_letter_id: int, *, default_zone: str) -> RetryOutcome:
    now = utcnow()
    zones: dict[str, ZoneInfo] = {}
    with engine.begin() as conn:
        letter = conn.execute(
            sa.select(dead_letters).where(dead_letters.c.dead_letter_id == dead_letter_id)
        ).one_or_none()
        if letter is None:
            raise LookupError(f"no dead letter {dead_letter_id}")
        if letter.status != "open":
            return RetryOutcome(dead_letter_id, True, f"already {letter.status}")
        offsets.lock_offsets(conn, letter.topic, [letter.kafka_partition])
        record = Record(
            topic=letter.topic,
            partition=letter.kafka_partition,
            offset=letter.kafka_offset,
            key=letter.raw_key,
            value=letter.raw_value,
            headers=tuple(
                (k, v.encode("latin-1")) for k, v in orjson.loads(letter.headers).items()
            ),
        )
        pids = {letter.payment_id} if letter.payment_id is not None else set()
        snapshot = repository.load_snapshot(conn, pids)
        if letter.payment_id is not None:
            # This letter itself must not block its own retry.
            snapshot.dead_lettered.get(letter.payment_id, set()).discard(letter.version)

        def zone_of(merchant_id: str) -> ZoneInfo:
            if merchant_id not in zones:
                name = repository.merchant_time_zone(conn, merchant_id)
                zones[merchant_id] = ZoneInfo(name or default_zone)
            return zones[merchant_id]

        changes = apply_batch([record], snapshot, zone_of)
        failures = [d for d in changes.dead_letters if d.status == "open"]
        if failures:
            conn.execute(
                dead_letters.update()
                .where(dead_letters.c.dead_letter_id == dead_letter_id)
                .values(reason=failures[0].reason)
            )
            return RetryOutcome(dead_letter_id, False, failures[0].reason)
        changes.dead_letters.clear()  # a resolved broken copy is this same letter
        repository.write_changes(conn, changes, snapshot, now)
        conn.execute(
            dead_letters.update()
            .where(dead_letters.c.dead_letter_id == dead_letter_id)
            .values(status="resolved", resolved_at=now)
        )
        applied = changes.applied
    return RetryOutcome(dead_letter_id, True, f"applied {applied} event(s)")
