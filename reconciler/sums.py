"""The write store's events, as the totals count them: summed by the database per (merchant,
currency, UTC quarter hour, type), or one by one.

The write store has its primary key and the unique ``event_id`` (UUIDv7, time-ordered), so a
span of time is a range of that index, which the database reads once and answers summed: one row
per group. Every zone's offset is a whole number of quarter hours, so each UTC quarter hour falls
in one local hour. Cost: a scan of the scope's events (a full audit: all of them), inside the
write database; what crosses the wire grows with merchants and quarter hours, not with events.
Nothing here begins a transaction: each function reads on the caller's connection.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from kessai.clock import as_utc
from kessai.schema import write


@dataclass(frozen=True, slots=True)
class EventRow:
    """What a totals bucket needs of one event (a typed-column read, no body)."""

    payment_id: uuid.UUID
    version: int
    merchant_id: str
    index: int
    """0: a capture (payments count and amount); 2: a refund."""
    amount: int
    currency: str
    occurred_at: datetime


def _index(event_type: str) -> int:
    return 0 if event_type == "PaymentCaptured" else 2


def _quarter_of(conn: sa.Connection, column: sa.ColumnElement[datetime]) -> sa.ColumnElement[int]:
    """The UTC quarter hour of a stored naive UTC time, as a whole number (quarter hours since
    1970): a number, not text, so the database groups on a small key. Every zone's offset is a
    whole number of quarter hours, so a UTC quarter hour lies within one local hour."""
    # Constants as literals: the expression is repeated in GROUP BY, where a bound parameter
    # would make it a different expression.
    if conn.dialect.name == "sqlite":
        seconds = sa.func.strftime(sa.literal_column("'%s'"), column)
        return sa.cast(seconds, sa.Integer).op("/")(sa.literal_column("900"))
    minutes = sa.func.timestampdiff(
        sa.literal_column("MINUTE"), sa.literal_column("'1970-01-01'"), column
    )
    return minutes.op("DIV")(sa.literal_column("15"))


GroupedRow = tuple[str, str, int, int, int, int]
"""(merchant_id, currency, UTC quarter hour (quarter hours since 1970), index, events, amount)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TEMP_TABLE_BYTES = 256 * 1024 * 1024
"""The in-memory temporary table of the grouping, per session, while it runs: with MariaDB's
default 16 MiB, a million events' groups spill to disk (docs/BENCHMARKS.md)."""


def quarter_start(quarter: int) -> datetime:
    """The UTC start of a quarter hour numbered as in ``GroupedRow``."""
    return _EPOCH + timedelta(minutes=15 * quarter)


@contextlib.contextmanager
def _roomy_temp_tables(conn: sa.Connection) -> Iterator[None]:
    """Raise the session's in-memory temporary table size for one statement (MySQL/MariaDB),
    and put it back: the connection returns to the pool as it came."""
    if conn.dialect.name != "mysql":
        yield
        return
    before = conn.exec_driver_sql(
        "SELECT @@SESSION.tmp_table_size, @@SESSION.max_heap_table_size"
    ).one()
    conn.exec_driver_sql(
        "SET SESSION tmp_table_size = %s, max_heap_table_size = %s",
        (max(int(before[0]), _TEMP_TABLE_BYTES), max(int(before[1]), _TEMP_TABLE_BYTES)),
    )
    try:
        yield
    finally:
        conn.exec_driver_sql(
            "SET SESSION tmp_table_size = %s, max_heap_table_size = %s",
            (int(before[0]), int(before[1])),
        )


def sum_events(
    conn: sa.Connection,
    *,
    lower: uuid.UUID | None,
    below: uuid.UUID,
    leave_out: Collection[uuid.UUID] = (),
) -> list[GroupedRow]:
    """The write store's events with ``lower <= event_id < below``, summed by the database per
    (merchant, currency, UTC quarter hour, type): one range of the ``event_id`` index, one row
    per group back. ``leave_out``: payments counted one event at a time instead."""
    e = write.events.c
    quarter = _quarter_of(conn, e.occurred_at).label("quarter")
    captured = sa.case((e.event_type == "PaymentCaptured", 0), else_=2).label("kind")
    query = sa.select(
        e.merchant_id, e.currency, quarter, captured, sa.func.count(), sa.func.sum(e.amount)
    ).where(e.event_id < below)
    if lower is not None:
        query = query.where(e.event_id >= lower)
    if leave_out:
        query = query.where(e.payment_id.not_in(sorted(leave_out)))
    # ORDER BY NULL: MariaDB would otherwise sort the groups, which nothing here needs.
    query = query.group_by(e.merchant_id, e.currency, quarter, captured).order_by(sa.null())
    with _roomy_temp_tables(conn):
        return [
            (merchant_id, currency, int(q), int(index), int(n), int(amount or 0))
            for merchant_id, currency, q, index, n, amount in conn.execute(query)
        ]


def events_one_by_one(
    conn: sa.Connection, *, since: uuid.UUID | None, payment_ids: Collection[uuid.UUID] = ()
) -> list[EventRow]:
    """Events with ``event_id >= since`` (the run's last moments: few; None: none), and every
    event of ``payment_ids`` (primary-key lookups, 1,000 payments a query)."""
    e = write.events.c
    columns = (
        e.payment_id, e.version, e.merchant_id, e.event_type, e.amount, e.currency, e.occurred_at
    )  # fmt: skip
    queries = [] if since is None else [sa.select(*columns).where(e.event_id >= since)]
    ordered = sorted(payment_ids)
    for start in range(0, len(ordered), 1_000):
        chunk = ordered[start : start + 1_000]
        queries.append(sa.select(*columns).where(e.payment_id.in_(chunk)))
    found: dict[tuple[uuid.UUID, int], EventRow] = {}
    for query in queries:
        for pid, v, m, t, a, c, at in conn.execute(query):
            found[(pid, int(v))] = EventRow(pid, int(v), m, _index(t), int(a), c, as_utc(at))
    return [found[key] for key in sorted(found)]
