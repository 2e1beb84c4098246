"""Loading both sides in bulk: the write store's payments, events and outbox, the read database's
payments, refunds, parked events and dead letters, and the read rows with no payment behind them.

The write store is read only by primary key ranges / IN lists (``events`` PK
``(payment_id, version)``) and by its unique ``event_id`` index (UUIDv7, time-ordered); the
read database by the payments' and refunds' primary keys. A chunk of payments costs one query
per side, never one per payment. Nothing here begins a transaction: each function runs in the
caller's connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kessai.clock import as_utc
from kessai.events import parse_event
from kessai.schema import read, write
from reconciler.compare import Event, ReadPayment

EventRow = tuple[uuid.UUID, int, uuid.UUID, str, int, str]
"""An event to re-publish: (payment_id, version, event_id, event_type, schema_version, body)."""
SCAN_PAGE = 5_000


# -- the write store ---------------------------------------------------------------------------


def payment_keys_since(conn: sa.Connection, lower: uuid.UUID) -> set[bytes]:
    """Payments with an event whose event_id >= ``lower`` (a range of the unique index), as
    keys (the ids' 16 bytes: no UUID object is made for a payment the first pass finds
    consistent).

    In pages of ``SCAN_PAGE`` events: the page's last event id is found by skipping along the
    index, then the page's distinct payment ids are read."""
    e = write.events.c
    found: set[bytes] = set()
    after: uuid.UUID | None = None
    while True:
        start = e.event_id >= lower if after is None else e.event_id > after
        last = conn.execute(
            sa.select(e.event_id).where(start).order_by(e.event_id).offset(SCAN_PAGE - 1).limit(1)
        ).scalar_one_or_none()
        page = sa.select(key_of(e.payment_id)).distinct().where(start)
        if last is not None:
            page = page.where(e.event_id <= last)
        found.update(bytes(key) for key in conn.execute(page).scalars())
        if last is None:
            return found
        after = last


def key_of(column: Any) -> sa.ColumnElement[bytes]:
    """A binary UUID column as its raw 16 bytes, both in results and in comparisons."""
    return sa.type_coerce(column, sa.LargeBinary)


def count_payments(conn: sa.Connection) -> int:
    return int(
        conn.execute(
            sa.select(sa.func.count()).select_from(write.events).where(write.events.c.version == 1)
        ).scalar_one()
    )


def payment_keys_after(conn: sa.Connection, after: bytes | None, limit: int) -> list[bytes]:
    """The next ``limit`` payment keys after ``after``, in primary-key order (a keyset)."""
    e = write.events.c
    pid = key_of(e.payment_id)
    query = sa.select(pid).where(e.version == 1)
    if after is not None:
        query = query.where(pid > after)
    return [bytes(k) for k in conn.execute(query.order_by(e.payment_id).limit(limit)).scalars()]


def load_events(conn: sa.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Event]]:
    """The events of ``ids``, in version order (one IN-list query over the primary key)."""
    events: dict[uuid.UUID, list[Event]] = {}
    rows = conn.execute(
        sa.select(write.events.c.payment_id, write.events.c.body)
        .where(write.events.c.payment_id.in_(sorted(ids)))
        .order_by(write.events.c.payment_id, write.events.c.version)
    )
    for pid, body in rows:
        events.setdefault(pid, []).append(parse_event(body))
    return events


def load_bodies(conn: sa.Connection, ids: Sequence[uuid.UUID]) -> list[EventRow]:
    """Rows to re-publish: (payment_id, version, event_id, event_type, schema_version, body)."""
    e = write.events.c
    rows = conn.execute(
        sa.select(e.payment_id, e.version, e.event_id, e.event_type, e.schema_version, e.body)
        .where(e.payment_id.in_(sorted(ids)))
        .order_by(e.payment_id, e.version)
    )
    return [(pid, int(v), eid, et, int(sv), body) for pid, v, eid, et, sv, body in rows]


@dataclass(frozen=True, slots=True)
class OutboxView:
    in_flight: set[uuid.UUID]
    stuck_count: int
    oldest_created_at: datetime | None
    oldest_event_id: uuid.UUID | None


def outbox_view(conn: sa.Connection, stuck_before: datetime) -> OutboxView:
    """What the relay has not published yet (normally a handful of rows)."""
    o = write.outbox.c
    in_flight = set(conn.execute(sa.select(o.payment_id).distinct()).scalars())
    stuck_count, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(o.created_at)).where(o.created_at < stuck_before)
    ).one()
    oldest_event_id = conn.execute(sa.select(sa.func.min(o.event_id))).scalar_one_or_none()
    if isinstance(oldest_event_id, bytes):  # aggregates lose the column type
        oldest_event_id = uuid.UUID(bytes=oldest_event_id)
    if isinstance(oldest, datetime) and oldest.tzinfo is None:
        oldest = as_utc(oldest)
    return OutboxView(in_flight, int(stuck_count), oldest, oldest_event_id)


# -- the read database -------------------------------------------------------------------------


def load_read(conn: sa.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ReadPayment]:
    p, r = read.payments.c, read.refunds.c
    ordered = sorted(ids)
    refunds: dict[uuid.UUID, list[tuple[int, int]]] = {}
    for pid, version, amount in conn.execute(
        sa.select(r.payment_id, r.version, r.amount)
        .where(r.payment_id.in_(ordered))
        .order_by(r.payment_id, r.version)
    ):
        refunds.setdefault(pid, []).append((int(version), int(amount)))
    return {
        row.payment_id: ReadPayment(
            merchant_id=row.merchant_id,
            captured_amount=int(row.captured_amount),
            refunded_amount=int(row.refunded_amount),
            version=int(row.version),
            status=row.status,
            refunds=tuple(refunds.get(row.payment_id, ())),
        )
        for row in conn.execute(
            sa.select(
                p.payment_id,
                p.merchant_id,
                p.captured_amount,
                p.refunded_amount,
                p.version,
                p.status,
            ).where(p.payment_id.in_(ordered))
        )
    }


def parked_and_dead_letters(
    conn: sa.Connection,
) -> tuple[list[tuple[uuid.UUID, int, str]], list[tuple[int, uuid.UUID | None, int | None, str]]]:
    """Every parked event and every open dead letter (normally none: these are problems)."""
    pe, dl = read.parked_events.c, read.dead_letters.c
    parked = [
        (pid, int(version), reason)
        for pid, version, reason in conn.execute(
            sa.select(pe.payment_id, pe.version, pe.reason).order_by(pe.payment_id, pe.version)
        )
    ]
    letters = [
        (int(i), pid, version, reason)
        for i, pid, version, reason in conn.execute(
            sa.select(dl.dead_letter_id, dl.payment_id, dl.version, dl.reason)
            .where(dl.status == "open")
            .order_by(dl.dead_letter_id)
        )
    ]
    return parked, letters


# -- read rows with nothing behind them --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Orphan:
    """A read row (a payment, or refund rows alone) whose payment has no event in the write
    store: money the dashboard shows that was never taken."""

    payment_id: uuid.UUID
    merchant_id: str
    captured_amount: int
    refunded_amount: int
    version: int | None
    moments: tuple[datetime, ...]
    """When the row and its refund rows were created: the totals buckets they counted in."""


def read_payment_ids(
    conn: sa.Connection, *, lower: uuid.UUID | None, after: uuid.UUID | None, limit: int
) -> list[uuid.UUID]:
    """A keyset page of read payment ids at or above ``lower`` (payment ids are UUIDv7 too, so
    an incremental run reads only the part of the primary key written since its watermark)."""
    p = read.payments.c
    query = sa.select(p.payment_id)
    if lower is not None:
        query = query.where(p.payment_id >= lower)
    if after is not None:
        query = query.where(p.payment_id > after)
    return list(conn.execute(query.order_by(p.payment_id).limit(limit)).scalars())


def refunds_without_payment(conn: sa.Connection, lower: uuid.UUID | None) -> set[uuid.UUID]:
    """Payments with refund rows and no payment row (the projector never writes those)."""
    r, p = read.refunds.c, read.payments.c
    query = (
        sa.select(r.payment_id)
        .distinct()
        .select_from(
            read.refunds.outerjoin(read.payments, read.payments.c.payment_id == r.payment_id)
        )
        .where(p.payment_id.is_(None))
    )
    if lower is not None:
        query = query.where(r.payment_id >= lower)
    return set(conn.execute(query).scalars())


def known_payments(conn: sa.Connection, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` the write store has an event for (primary key lookups)."""
    e = write.events.c
    return set(
        conn.execute(
            sa.select(e.payment_id).where(e.payment_id.in_(sorted(ids)), e.version == 1)
        ).scalars()
    )


def load_orphans(conn: sa.Connection, ids: Sequence[uuid.UUID]) -> list[Orphan]:
    p, r = read.payments.c, read.refunds.c
    ordered = sorted(ids)
    refunds: dict[uuid.UUID, list[tuple[str, int, datetime]]] = {}
    for pid, merchant_id, amount, created_at in conn.execute(
        sa.select(r.payment_id, r.merchant_id, r.amount, r.created_at).where(
            r.payment_id.in_(ordered)
        )
    ):
        refunds.setdefault(pid, []).append((merchant_id, int(amount), created_at))
    rows = {
        row.payment_id: row
        for row in conn.execute(
            sa.select(
                p.payment_id,
                p.merchant_id,
                p.captured_amount,
                p.refunded_amount,
                p.version,
                p.created_at,
            ).where(p.payment_id.in_(ordered))
        )
    }
    found = []
    for pid in ordered:
        row, its_refunds = rows.get(pid), refunds.get(pid, [])
        if row is None and not its_refunds:
            continue
        moments = tuple(created for _, _, created in its_refunds)
        if row is not None:
            found.append(
                Orphan(
                    pid,
                    row.merchant_id,
                    int(row.captured_amount),
                    int(row.refunded_amount),
                    int(row.version),
                    (row.created_at, *moments),
                )
            )
        else:
            found.append(
                Orphan(
                    pid,
                    its_refunds[0][0],
                    0,
                    sum(amount for _, amount, _ in its_refunds),
                    None,
                    moments,
                )
            )
    return found
