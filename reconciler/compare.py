"""Loading both sides in bulk and comparing a payment's read row with the fold of its events.

The write store is read only by primary key ranges / IN lists (``events`` PK
``(payment_id, version)``) and by its unique ``event_id`` index (UUIDv7, time-ordered); the
read database by the payments' and refunds' primary keys. A chunk of payments costs one query
per side, never one per payment.

Counts and checksums first, then drill down. Parsing every event body (pydantic) and folding
it, and moving every row of both sides through the driver, is what a check of a million events
spent its time on (see docs/BENCHMARKS.md). So a block of payments (``FINGERPRINT_PAGE``) is
first compared by fingerprints that each database computes itself and answers in one row:

- write store: per payment, from the typed columns ``event_type``, ``amount`` and ``version``
  (not the body): captured and refunded amounts, last version, the status they imply, and each
  refund as (version, amount); summed over the block as a count and a sum of CRC32s;
- read database: the same of the ``payments`` rows (captured, refunded, version, status) and of
  the ``refunds`` rows (version, amount).

Equal fingerprints mean the read side is the fold of the write store for the whole block. A
block that differs is fingerprinted again in chunks of ``KESSAI_RECONCILE_CHUNK_SIZE``; only a
chunk whose fingerprints differ is compared payment by payment as before (bodies parsed, events
folded with ``kessai.ledger.fold``), and that exact comparison alone produces findings, so what
is reported and repaired is unchanged. What the first pass trusts: that an event's typed columns
say what its body says. Both are written by the same INSERT from the same event object
(``command_service/repository.py``) and the store refuses UPDATE and DELETE; a body that
disagrees with its columns is noticed only when its payment differs for another reason. And a
sum of 32-bit checksums: a difference escapes it only if it changes that sum by exactly nothing
(about one chance in four billion per block, for damage that is not made to measure).
A block whose ids are exactly the write store's payments between its first and last id (the
usual case: a full audit, or the new payments of an incremental run) is given to both databases
as that primary-key range rather than as an IN list. Looking for orphans (read rows with no
payment behind them) works the same way: pages of read ids whose fingerprint equals that of the
write store's payments over the same range are not read at all. CRC32 is MySQL's built-in; on
SQLite the same function (``zlib.crc32`` of the UTF-8 text) is registered on the connection.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kessai.events import PaymentCaptured, PaymentRefunded, parse_event
from kessai.ids import bound_at, bound_at_ms, time_of
from kessai.ledger import InvariantViolation, PaymentState, fold
from kessai.schema import read, write
from reconciler.records import Finding

Event = PaymentCaptured | PaymentRefunded
EventRow = tuple[uuid.UUID, int, uuid.UUID, str, int, str]
"""An event to re-publish: (payment_id, version, event_id, event_type, schema_version, body)."""
SCAN_PAGE = 5_000

__all__ = ["bound_at", "bound_at_ms", "time_of"]  # the watermark's helpers, from kessai.ids


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
        from kessai.clock import as_utc

        oldest = as_utc(oldest)
    return OutboxView(in_flight, int(stuck_count), oldest, oldest_event_id)


def newest_event_id(conn: sa.Connection) -> uuid.UUID | None:
    value = conn.execute(sa.select(sa.func.max(write.events.c.event_id))).scalar_one_or_none()
    if isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    return value if isinstance(value, uuid.UUID) else None


# -- the read database -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadPayment:
    merchant_id: str
    captured_amount: int
    refunded_amount: int
    version: int
    status: str
    refunds: tuple[tuple[int, int], ...]
    """(version, amount) of the payment's refund rows."""


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


# -- comparing ---------------------------------------------------------------------------------


def _shape(state: PaymentState) -> dict[str, object]:
    return {
        "captured_amount": state.captured_amount,
        "refunded_amount": state.refunded_amount,
        "version": state.version,
        "status": state.status,
    }


def _read_shape(row: ReadPayment) -> dict[str, object]:
    return {
        "captured_amount": row.captured_amount,
        "refunded_amount": row.refunded_amount,
        "version": row.version,
        "status": row.status,
    }


def _refunds_of(events: Iterable[Event]) -> tuple[tuple[int, int], ...]:
    return tuple((e.version, e.payload.amount) for e in events if isinstance(e, PaymentRefunded))


def compare(
    payment_id: uuid.UUID, events: Sequence[Event], row: ReadPayment | None
) -> Finding | None:
    """A finding if the read side does not equal the fold of ``events``.

    ``details["reset"]`` says how it is repaired: a row that is only behind (it equals the fold
    of a prefix of the events) is brought forward by re-publishing; a row that is wrong at its
    own version must first be removed, or the projector would skip the re-published events as
    duplicates.
    """
    try:
        state = fold(events)
    except InvariantViolation as exc:
        return Finding(
            kind="invalid_write_history",
            payment_id=payment_id,
            details={"error": str(exc)},
        )
    if state is None:
        return None
    if row is None:
        return Finding(
            kind="missing",
            payment_id=payment_id,
            merchant_id=state.merchant_id,
            details={"expected": _shape(state), "reset": False},
        )
    expected = (_shape(state), _refunds_of(events))
    if (_read_shape(row), row.refunds) == expected:
        return None
    behind = False
    if 1 <= row.version < state.version:
        prefix = events[: row.version]
        prefix_state = fold(prefix)
        behind = prefix_state is not None and (_read_shape(row), row.refunds) == (
            _shape(prefix_state),
            _refunds_of(prefix),
        )
    return Finding(
        kind="mismatch",
        payment_id=payment_id,
        merchant_id=state.merchant_id,
        details={
            "expected": _shape(state),
            "actual": _read_shape(row),
            "expected_refunds": len(expected[1]),
            "actual_refunds": len(row.refunds),
            "reset": not behind,
        },
    )


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


# -- the first pass: fingerprints of whole chunks ----------------------------------------------

Fingerprint = tuple[int, int, int, int]
"""(payments, sum of their CRC32s, refunds, sum of their CRC32s) of a chunk."""
FINGERPRINT_PAGE = 5_000
"""Payments per fingerprinted block (and read payment ids per fingerprinted page when looking
for orphans). A block that differs is fingerprinted again in chunks of
``KESSAI_RECONCILE_CHUNK_SIZE``, and only the chunks that differ are compared payment by
payment."""
DENSE_MIN = 32
"""Below this many payments a chunk is always given as an IN list."""


def _crc32_text(text: str | None) -> int | None:
    return None if text is None else zlib.crc32(text.encode())


def enable_crc32(conn: sa.Connection) -> None:
    """Make ``crc32(text)`` callable on a SQLite connection (MySQL has it built in)."""
    if conn.dialect.name == "sqlite":
        raw: Any = conn.connection.driver_connection
        raw.create_function("crc32", 1, _crc32_text, deterministic=True)


def _text(value: Any) -> sa.ColumnElement[str]:
    return sa.cast(value, sa.String)


def crc32(*parts: Any) -> sa.ColumnElement[int]:
    """CRC32 of the parts as text joined by ``:`` (the same on MySQL and SQLite)."""
    text = _text(parts[0])
    for part in parts[1:]:
        text = text.concat(":").concat(_text(part))
    return sa.func.crc32(text, type_=sa.BigInteger)


def _number(value: object) -> int:
    return 0 if value is None else int(value)  # type: ignore[call-overload]


def is_key_range(conn: sa.Connection, keys: Sequence[bytes]) -> bool:
    """Whether the write store's payments from ``keys[0]`` to ``keys[-1]`` are exactly ``keys``
    (sorted, distinct): then the block can be given as that primary-key range. Reads at most
    ``len(keys) + 1`` index entries."""
    if len(keys) < DENSE_MIN:
        return False
    e = write.events.c
    pid = key_of(e.payment_id)
    inside = (
        sa.select(e.payment_id)
        .where(e.version == 1, pid >= keys[0], pid <= keys[-1])
        .limit(len(keys) + 1)
        .subquery()
    )
    return conn.execute(sa.select(sa.func.count()).select_from(inside)).scalar_one() == len(keys)


def _of_chunk(column: Any, keys: Sequence[bytes], key_range: bool) -> sa.ColumnElement[bool]:
    key = key_of(column)
    if key_range:
        return sa.and_(key >= keys[0], key <= keys[-1])
    return key.in_(keys)


def write_fingerprint(
    conn: sa.Connection, keys: Sequence[bytes], *, key_range: bool
) -> Fingerprint:
    """The chunk's fingerprint from the events' typed columns, computed by the write store."""
    enable_crc32(conn)
    e = write.events.c
    refund = e.event_type == "PaymentRefunded"
    per_payment = (
        sa.select(
            e.payment_id,
            sa.func.sum(sa.case((e.event_type == "PaymentCaptured", e.amount), else_=0)).label(
                "captured"
            ),
            sa.func.sum(sa.case((refund, e.amount), else_=0)).label("refunded"),
            sa.func.max(e.version).label("version"),
            sa.func.sum(sa.case((refund, 1), else_=0)).label("refunds"),
            sa.func.sum(
                sa.case((refund, crc32(sa.func.hex(e.payment_id), e.version, e.amount)), else_=0)
            ).label("refunds_crc"),
        )
        .where(_of_chunk(e.payment_id, keys, key_range))
        .group_by(e.payment_id)
        .subquery()
    )
    c = per_payment.c
    status = sa.case(
        (c.refunded == 0, "captured"),
        (c.refunded < c.captured, "partially_refunded"),
        else_="refunded",
    )
    payments, payments_crc, refunds, refunds_crc = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.sum(
                crc32(sa.func.hex(c.payment_id), c.captured, c.refunded, c.version, status)
            ),
            sa.func.sum(c.refunds),
            sa.func.sum(c.refunds_crc),
        )
    ).one()
    return _number(payments), _number(payments_crc), _number(refunds), _number(refunds_crc)


def read_fingerprint(conn: sa.Connection, keys: Sequence[bytes], *, key_range: bool) -> Fingerprint:
    """The chunk's fingerprint from the read rows, computed by the read database."""
    enable_crc32(conn)
    p, r = read.payments.c, read.refunds.c
    rows = conn.execute(
        sa.union_all(
            sa.select(
                sa.literal(0).label("side"),
                sa.func.count().label("n"),
                sa.func.sum(
                    crc32(
                        sa.func.hex(p.payment_id),
                        p.captured_amount,
                        p.refunded_amount,
                        p.version,
                        p.status,
                    )
                ).label("crc"),
            ).where(_of_chunk(p.payment_id, keys, key_range)),
            sa.select(
                sa.literal(1).label("side"),
                sa.func.count().label("n"),
                sa.func.sum(crc32(sa.func.hex(r.payment_id), r.version, r.amount)).label("crc"),
            ).where(_of_chunk(r.payment_id, keys, key_range)),
        )
    ).all()
    got = {int(side): (_number(n), _number(crc)) for side, n, crc in rows}
    payments, refunds = got.get(0, (0, 0)), got.get(1, (0, 0))
    return payments[0], payments[1], refunds[0], refunds[1]


def read_page_end(
    conn: sa.Connection, *, lower: uuid.UUID | None, after: uuid.UUID | None, size: int
) -> uuid.UUID | None:
    """The ``size``-th read payment id at or above ``lower`` and after ``after`` (None: fewer
    remain): the end of a keyset page, without reading the page."""
    p = read.payments.c
    query = sa.select(p.payment_id)
    if lower is not None:
        query = query.where(p.payment_id >= lower)
    if after is not None:
        query = query.where(p.payment_id > after)
    found: uuid.UUID | None = conn.execute(
        query.order_by(p.payment_id).offset(size - 1).limit(1)
    ).scalar_one_or_none()
    return found


def ids_fingerprint(
    conn: sa.Connection,
    table: sa.Table,
    *,
    lower: uuid.UUID | None,
    after: uuid.UUID | None,
    last: uuid.UUID,
) -> tuple[int, int]:
    """(count, sum of CRC32s) of the payment ids of ``table`` (``events``: its version-1 rows)
    in ``[lower, ...]``, ``(after, last]``: equal on both sides means the same ids."""
    enable_crc32(conn)
    pid = table.c.payment_id
    query = sa.select(sa.func.count(), sa.func.sum(crc32(sa.func.hex(pid)))).where(pid <= last)
    if table is write.events:
        query = query.where(table.c.version == 1)
    if lower is not None:
        query = query.where(pid >= lower)
    if after is not None:
        query = query.where(pid > after)
    n, crc = conn.execute(query).one()
    return _number(n), _number(crc)


def _keys_between(
    conn: sa.Connection,
    table: sa.Table,
    *,
    lower: uuid.UUID | None,
    after: uuid.UUID | None,
    last: uuid.UUID,
) -> set[bytes]:
    pid = key_of(table.c.payment_id)
    query = sa.select(pid).where(pid <= last.bytes)
    if table is write.events:
        query = query.where(table.c.version == 1)
    if lower is not None:
        query = query.where(pid >= lower.bytes)
    if after is not None:
        query = query.where(pid > after.bytes)
    return {bytes(key) for key in conn.execute(query).scalars()}


def unknown_between(
    rconn: sa.Connection,
    wconn: sa.Connection,
    *,
    lower: uuid.UUID | None,
    after: uuid.UUID | None,
    last: uuid.UUID,
) -> list[uuid.UUID]:
    """Read payment ids in ``[lower, ...]``, ``(after, last]`` that the write store has no
    payment for: both sides' ids of that key range, as raw bytes, and their difference."""
    here = _keys_between(rconn, read.payments, lower=lower, after=after, last=last)
    there = _keys_between(wconn, write.events, lower=lower, after=after, last=last)
    unknown = here - there
    return [uuid.UUID(bytes=key) for key in sorted(unknown)]
