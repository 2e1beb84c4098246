"""Counts and checksums that each database computes itself: the first pass of the comparison.

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
(``command_service/handlers.py``, ``append_events``) and the store refuses UPDATE and DELETE; a
body that disagrees with its columns is noticed only when its payment differs for another
reason. And a sum of 32-bit checksums: a difference escapes it only if it changes that sum by
exactly nothing (about one chance in four billion per block, for damage that is not made to
measure).
A block whose ids are exactly the write store's payments between its first and last id (the
usual case: a full audit, or the new payments of an incremental run) is given to both databases
as that primary-key range rather than as an IN list. Looking for orphans (read rows with no
payment behind them) works the same way: pages of read ids whose fingerprint equals that of the
write store's payments over the same range are not read at all. CRC32 is MySQL's built-in; on
SQLite the same function (``zlib.crc32`` of the UTF-8 text) is registered on the connection.

Nothing here begins a transaction: each function runs in the caller's connection.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from kessai.schema import read, write
from reconciler.loaders import key_of

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


def same(
    wconn: sa.Connection, rconn: sa.Connection, keys: Sequence[bytes], *, key_range: bool
) -> bool:
    """Whether the chunk fingerprints the same on both sides: then its read side is the fold of
    the write store (see the module's docstring for what that trusts)."""
    expected = write_fingerprint(wconn, keys, key_range=key_range)
    return read_fingerprint(rconn, keys, key_range=key_range) == expected
