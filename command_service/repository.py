"""SQL of the write store, used by the command handlers. Nothing here begins or commits."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kessai.events import PaymentCaptured, PaymentRefunded, event_to_json, parse_event
from kessai.schema.write import events, idempotency_keys, outbox

_MYSQL_RETRYABLE = {1205, 1213}  # lock wait timeout, deadlock


def is_write_conflict(exc: BaseException) -> bool:
    """A failure that another transaction caused and a fresh attempt can resolve."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        orig = exc.orig
        code = orig.args[0] if orig is not None and orig.args else None
        return code in _MYSQL_RETRYABLE or "database is locked" in str(orig)
    return False


def shard_of(payment_id: uuid.UUID, shards: int) -> int:
    """The outbox shard of a payment: every event of one payment lands in the same shard."""
    return zlib.crc32(payment_id.bytes) % shards


def load_events_of_payments(
    conn: sa.Connection, payment_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, list[PaymentCaptured | PaymentRefunded]]:
    """The events of several payments, each in version order, in one primary-key read."""
    found: dict[uuid.UUID, list[PaymentCaptured | PaymentRefunded]] = {}
    if not payment_ids:
        return found
    rows = conn.execute(
        sa.select(events.c.payment_id, events.c.body)
        .where(events.c.payment_id.in_(sorted(payment_ids)))
        .order_by(events.c.payment_id, events.c.version)
    )
    for payment_id, body in rows:
        found.setdefault(payment_id, []).append(parse_event(body))
    return found


def append_events(
    conn: sa.Connection,
    new_events: Sequence[PaymentCaptured | PaymentRefunded],
    *,
    shards: int,
) -> None:
    """Append events and their outbox rows. A duplicate (payment_id, version) raises
    ``IntegrityError``: that is the optimistic-concurrency check."""
    if not new_events:  # a recorded answer without events (a declined card payment)
        return
    event_rows = []
    outbox_rows = []
    for event in new_events:
        body = event_to_json(event).decode()
        amount = event.payload.amount
        event_rows.append(
            {
                "payment_id": event.payment_id,
                "version": event.version,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "merchant_id": event.merchant_id,
                "amount": amount,
                "currency": event.payload.currency,
                "occurred_at": event.occurred_at,
                "recorded_at": event.recorded_at,
                "body": body,
            }
        )
        outbox_rows.append(
            {
                "shard": shard_of(event.payment_id, shards),
                "payment_id": event.payment_id,
                "version": event.version,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "created_at": event.recorded_at,
                "body": body,
            }
        )
    conn.execute(events.insert(), event_rows)
    conn.execute(outbox.insert(), outbox_rows)


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    request: str
    response_status: int
    response_body: str
    expires_at: datetime


def get_idempotency(conn: sa.Connection, client_id: str, key: str) -> IdempotencyRecord | None:
    row = conn.execute(
        sa.select(
            idempotency_keys.c.request,
            idempotency_keys.c.response_status,
            idempotency_keys.c.response_body,
            idempotency_keys.c.expires_at,
        ).where(
            idempotency_keys.c.client_id == client_id,
            idempotency_keys.c.idempotency_key == key,
        )
    ).first()
    return None if row is None else IdempotencyRecord(*row)


def get_idempotency_many(
    conn: sa.Connection, scopes: Collection[tuple[str, str]]
) -> dict[tuple[str, str], IdempotencyRecord]:
    """The records of several (client_id, idempotency_key) pairs, in one primary-key read."""
    if not scopes:
        return {}
    rows = conn.execute(
        sa.select(
            idempotency_keys.c.client_id,
            idempotency_keys.c.idempotency_key,
            idempotency_keys.c.request,
            idempotency_keys.c.response_status,
            idempotency_keys.c.response_body,
            idempotency_keys.c.expires_at,
        ).where(
            sa.tuple_(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key).in_(
                sorted(scopes)
            )
        )
    )
    return {(row[0], row[1]): IdempotencyRecord(*row[2:]) for row in rows}


def delete_idempotency_many(conn: sa.Connection, scopes: Collection[tuple[str, str]]) -> None:
    if scopes:
        conn.execute(
            idempotency_keys.delete().where(
                sa.tuple_(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key).in_(
                    sorted(scopes)
                )
            )
        )


def save_idempotency_many(conn: sa.Connection, records: Sequence[dict[str, Any]]) -> None:
    """Insert idempotency records (rows of ``idempotency_keys``) in one multi-row INSERT, in
    primary-key order. A key that another transaction holds raises ``IntegrityError``."""
    if records:
        conn.execute(
            idempotency_keys.insert(),
            sorted(records, key=lambda r: (r["client_id"], r["idempotency_key"])),
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
