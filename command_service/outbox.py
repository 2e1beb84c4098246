"""SQL of the relay: shard leases, reading unpublished outbox rows, marking them published,
and its housekeeping (forgetting expired idempotency records).

Each outbox shard is published by at most one relay at a time (a lease with an expiry), so two
relays never interleave one payment's events and a crashed relay's shards are taken over once
its lease lapses. Published rows are deleted: the outbox holds only what is still to publish,
and the relay reads the rows present in id order, never "ids above the last one seen" (ids
commit out of order, and such a reader would skip a late commit forever).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from kessai.schema.write import idempotency_keys, outbox, relay_leases
from kessai.write_store import shard_of

__all__ = ["shard_of"]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    outbox_id: int
    payment_id: uuid.UUID
    version: int
    event_id: uuid.UUID
    event_type: str
    schema_version: int
    body: str


def claim_leases(
    conn: sa.Connection, *, owner: str, shards: int, now: datetime, ttl: timedelta
) -> list[int]:
    """Renew this relay's leases and take any free or lapsed ones; return the shards held."""
    known = set(conn.execute(sa.select(relay_leases.c.shard)).scalars())
    missing = [
        {"shard": s, "owner": None, "expires_at": None} for s in range(shards) if s not in known
    ]
    if missing:
        try:
            with conn.begin_nested():
                conn.execute(relay_leases.insert(), missing)
        except sa.exc.IntegrityError:
            pass  # another relay inserted them first
    expires = now + ttl
    conn.execute(
        relay_leases.update()
        .where(
            relay_leases.c.shard < shards,
            sa.or_(
                relay_leases.c.owner == owner,
                relay_leases.c.owner.is_(None),
                relay_leases.c.expires_at < now,
            ),
        )
        .values(owner=owner, expires_at=expires)
    )
    return list(
        conn.execute(
            sa.select(relay_leases.c.shard)
            .where(relay_leases.c.owner == owner, relay_leases.c.shard < shards)
            .order_by(relay_leases.c.shard)
        ).scalars()
    )


def release_leases(conn: sa.Connection, *, owner: str) -> None:
    conn.execute(
        relay_leases.update()
        .where(relay_leases.c.owner == owner)
        .values(owner=None, expires_at=None)
    )


def fetch_unpublished(conn: sa.Connection, *, shards: Sequence[int], limit: int) -> list[OutboxRow]:
    if not shards:
        return []
    rows = conn.execute(
        sa.select(
            outbox.c.outbox_id,
            outbox.c.payment_id,
            outbox.c.version,
            outbox.c.event_id,
            outbox.c.event_type,
            outbox.c.schema_version,
            outbox.c.body,
        )
        .where(outbox.c.shard.in_(shards))
        .order_by(outbox.c.outbox_id)
        .limit(limit)
    )
    return [OutboxRow(*row) for row in rows]


def mark_published(conn: sa.Connection, outbox_ids: Sequence[int]) -> None:
    for start in range(0, len(outbox_ids), 1000):
        conn.execute(
            outbox.delete().where(outbox.c.outbox_id.in_(outbox_ids[start : start + 1000]))
        )


def purge_expired_idempotency(conn: sa.Connection, now: datetime, *, limit: int = 1000) -> int:
    """Forget up to ``limit`` expired keys (by the ``expires_at`` index); returns how many."""
    doomed = conn.execute(
        sa.select(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key)
        .where(idempotency_keys.c.expires_at < now)
        .limit(limit)
    ).all()
    if doomed:
        conn.execute(
            idempotency_keys.delete().where(
                sa.tuple_(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key).in_(
                    [tuple(row) for row in doomed]
                )
            )
        )
    return len(doomed)
