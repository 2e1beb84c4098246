"""The command API's own SQL: nothing here begins or commits (``handlers.commit_batch`` does).

- Payments: ``load_events_of_payments`` reads a payment's history (a primary-key range).
- Idempotency records: read, replaced and saved in one statement each per batch.

Appending events of every kind with their outbox rows, and reading wallets and registrations,
is shared with the other writers of the write store: ``kessai/write_store.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kessai.db import upsert
from kessai.events import parse_event
from kessai.schema.write import events, idempotency_keys
from kessai.write_store import (
    Event,
    PaymentEvent,
    WalletEvent,
    append_events,
    is_write_conflict,
    load_registrations,
    load_wallets,
    registration_rows,
    shard_of,
    wallet_rows,
)

__all__ = [
    "Event",
    "PaymentEvent",
    "WalletEvent",
    "append_events",
    "is_write_conflict",
    "load_registrations",
    "load_wallets",
    "registration_rows",
    "shard_of",
    "wallet_rows",
]
Scope = tuple[str, str]
"""(API key id, Idempotency-Key): idempotency keys are scoped per API client."""


def load_events_of_payments(
    conn: sa.Connection, payment_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, list[PaymentEvent]]:
    """The events of several payments, each in version order, in one primary-key read."""
    found: dict[uuid.UUID, list[PaymentEvent]] = {}
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


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    request: str
    response_status: int
    response_body: str
    expires_at: datetime


_RECORD_COLUMNS = (
    idempotency_keys.c.request,
    idempotency_keys.c.response_status,
    idempotency_keys.c.response_body,
    idempotency_keys.c.expires_at,
)


def _scope_in(scopes: Collection[Scope]) -> sa.ColumnElement[bool]:
    """(client_id, idempotency_key) among ``scopes``, in primary-key order."""
    return sa.tuple_(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key).in_(
        sorted(scopes)
    )


def get_idempotency(conn: sa.Connection, client_id: str, key: str) -> IdempotencyRecord | None:
    row = conn.execute(
        sa.select(*_RECORD_COLUMNS).where(
            idempotency_keys.c.client_id == client_id,
            idempotency_keys.c.idempotency_key == key,
        )
    ).first()
    return None if row is None else IdempotencyRecord(*row)


def get_idempotency_many(
    conn: sa.Connection, scopes: Collection[Scope]
) -> dict[Scope, IdempotencyRecord]:
    """The records of several (client_id, idempotency_key) pairs, in one primary-key read."""
    if not scopes:
        return {}
    rows = conn.execute(
        sa.select(
            idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key, *_RECORD_COLUMNS
        ).where(_scope_in(scopes))
    )
    return {(row[0], row[1]): IdempotencyRecord(*row[2:]) for row in rows}


def delete_idempotency_many(conn: sa.Connection, scopes: Collection[Scope]) -> None:
    if scopes:
        conn.execute(idempotency_keys.delete().where(_scope_in(scopes)))


def save_idempotency_many(conn: sa.Connection, records: Sequence[dict[str, Any]]) -> None:
    """Insert idempotency records (rows of ``idempotency_keys``) in one multi-row INSERT, in
    primary-key order. A key that another transaction holds raises ``IntegrityError``."""
    upsert(
        conn,
        idempotency_keys,
        sorted(records, key=lambda r: (r["client_id"], r["idempotency_key"])),
    )
