"""The SQL of the write store: nothing here begins or commits (``handlers.commit_batch`` does).

- Payments: ``load_events_of_payments`` reads a payment's history (a primary-key range);
  ``append_events`` appends events of payments and of wallets with their outbox rows. A
  duplicate ``(payment_id, version)`` or ``(user_id, version)`` is the optimistic-concurrency
  check: ``is_write_conflict``.
- Wallets: a wallet's balance is its newest movement (``kessai/wallets.py``): ``load_wallets``
  reads the newest row of every wallet a batch touches in one statement (a primary-key range
  per wallet, never a scan of its history).
- Registrations: ``load_registrations`` reads whether (and when) users are registered;
  ``append_events`` appends ``UserRegistered`` to ``user_registrations``, whose primary key
  (``user_id``) refuses a second registration of a user (``is_write_conflict`` too).
- Idempotency records: read, replaced and saved in one statement each per batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from command_service.outbox import shard_of
from kessai.db import upsert
from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    TopUpReceived,
    UserRegistered,
    WalletCredited,
    WalletDebited,
    event_to_json,
    parse_event,
    registration_stream_id,
    registration_to_json,
    wallet_event_to_json,
    wallet_stream_id,
)
from kessai.schema.write import (
    events,
    idempotency_keys,
    newest_wallet_movements,
    outbox,
    user_registrations,
    wallet_events,
)
from kessai.wallets import Wallet, movement_of

PaymentEvent = PaymentCaptured | PaymentRefunded
WalletEvent = TopUpReceived | WalletDebited | WalletCredited
Event = PaymentEvent | WalletEvent | UserRegistered
Scope = tuple[str, str]
"""(API key id, Idempotency-Key): idempotency keys are scoped per API client."""

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


def append_events(conn: sa.Connection, new_events: Sequence[Event], *, shards: int) -> None:
    """Append events of payments, of wallets and registrations, in primary-key order, and their
    outbox rows (a wallet event's under its stream id, ``wallet_stream_id``; a registration's
    under ``registration_stream_id``). A duplicate (payment_id, version) or (user_id, version)
    raises ``IntegrityError``: that is the optimistic-concurrency check; so does a second
    registration of a user (``user_registrations``' primary key)."""
    payment_events: list[PaymentEvent] = []
    of_wallets: list[WalletEvent] = []
    registered: list[UserRegistered] = []
    for event in new_events:
        if isinstance(event, PaymentCaptured | PaymentRefunded):
            payment_events.append(event)
        elif isinstance(event, UserRegistered):
            registered.append(event)
        else:
            of_wallets.append(event)
    payment_events.sort(key=lambda e: (e.payment_id, e.version))
    event_rows = []
    outbox_rows = []
    for event in payment_events:
        row = {
            "payment_id": event.payment_id,
            "version": event.version,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "body": event_to_json(event).decode(),
            "merchant_id": event.merchant_id,
            "amount": event.payload.amount,
            "currency": event.payload.currency,
            "occurred_at": event.occurred_at,
            "recorded_at": event.recorded_at,
        }
        event_rows.append(row)
        outbox_rows.append(_outbox_row(event.payment_id, row, shards))
    movements = wallet_rows(of_wallets)
    for row in movements:
        outbox_rows.append(_outbox_row(wallet_stream_id(str(row["user_id"])), row, shards))
    registrations = registration_rows(registered)
    for row in registrations:
        stream_id = registration_stream_id(str(row["user_id"]))
        outbox_rows.append(_outbox_row(stream_id, {**row, "version": 1}, shards))
    # Plain multi-row INSERTs handed to the driver as text (``kessai.db.upsert``, as the
    # projector writes): SQLAlchemy's executemany of a compiled insert costs more per row.
    upsert(conn, events, event_rows)
    upsert(conn, wallet_events, movements)
    upsert(conn, user_registrations, registrations)
    upsert(conn, outbox, outbox_rows)  # none: an answer without events (a declined card)


def _outbox_row(stream_id: uuid.UUID, row: Mapping[str, Any], shards: int) -> dict[str, Any]:
    """The outbox row of an event's row: published keyed by its stream (payment or wallet)."""
    return {
        "shard": shard_of(stream_id, shards),
        "payment_id": stream_id,
        "version": row["version"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "schema_version": row["schema_version"],
        "created_at": row["recorded_at"],
        "body": row["body"],
    }


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


def load_wallets(conn: sa.Connection, user_ids: Collection[str]) -> dict[str, Wallet]:
    """The wallet of every user in ``user_ids`` as its newest movement leaves it
    (``Wallet.empty`` for a user nothing has moved for yet), in one read."""
    found = {user_id: Wallet.empty(user_id) for user_id in user_ids}
    if not found:
        return found
    rows = conn.execute(newest_wallet_movements(found))
    for user_id, version, currency, balance in rows:
        found[user_id] = Wallet(
            user_id=user_id, currency=currency, balance=balance, version=version
        )
    return found


def wallet_rows(new_events: Sequence[WalletEvent]) -> list[dict[str, Any]]:
    """Rows of ``wallet_events`` for ``new_events``, in primary-key order."""
    rows = []
    for event in sorted(new_events, key=lambda e: (e.user_id, e.version)):
        movement = movement_of(event)
        rows.append(
            {
                "user_id": event.user_id,
                "version": event.version,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "currency": movement.currency,
                "amount": movement.amount,
                "balance_after": movement.balance_after,
                "recorded_at": event.recorded_at,
                "body": wallet_event_to_json(event).decode(),
            }
        )
    return rows


def registration_rows(new_events: Sequence[UserRegistered]) -> list[dict[str, Any]]:
    """Rows of ``user_registrations`` for ``new_events``, in primary-key order."""
    return [
        {
            "user_id": event.user_id,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "recorded_at": event.recorded_at,
            "body": registration_to_json(event).decode(),
        }
        for event in sorted(new_events, key=lambda e: e.user_id)
    ]


def load_registrations(conn: sa.Connection, user_ids: Collection[str]) -> dict[str, datetime]:
    """When each of ``user_ids`` that is registered was (its ``UserRegistered``'s
    ``recorded_at``), in one primary-key read."""
    if not user_ids:
        return {}
    r = user_registrations.c
    rows = conn.execute(sa.select(r.user_id, r.recorded_at).where(r.user_id.in_(sorted(user_ids))))
    return {str(user_id): recorded_at for user_id, recorded_at in rows}
