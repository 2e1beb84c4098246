"""SQL of the query API: reads of the read database, nothing else.

Every list is ordered ``created_at DESC, payment_id DESC`` and paged by keyset on that pair,
served by ``ix_payments_merchant_id_created_at_payment_id`` (a merchant's payments) or
``ix_payments_user_id_created_at_payment_id`` (a user's); a user's statement is ordered
``version DESC`` and paged on it, within the primary key ``(user_id, version)`` of
``wallet_movements``. Nothing here begins or commits: the
handler owns the (read-only) transaction. The summary's SQL is with its route, in
``routes/summary.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kessai.schema.read import (
    merchants,
    payments,
    projector_offsets,
    reconciler_state,
    reconciliation_findings,
    reconciliation_runs,
    refunds,
    wallet_movements,
    wallets,
)
from query_service.cursor import Position

Condition = sa.ColumnElement[bool]


def payment(conn: sa.Connection, payment_id: uuid.UUID) -> sa.Row[Any] | None:
    return conn.execute(sa.select(payments).where(payments.c.payment_id == payment_id)).first()


def refunds_of(conn: sa.Connection, payment_id: uuid.UUID) -> Sequence[sa.Row[Any]]:
    """A payment's refunds in the order they happened (a primary-key prefix scan)."""
    return conn.execute(
        sa.select(refunds).where(refunds.c.payment_id == payment_id).order_by(refunds.c.version)
    ).all()


def probe(conn: sa.Connection) -> None:
    conn.execute(sa.select(sa.literal(1)).select_from(payments).limit(1)).all()


def merchant_time_zone(conn: sa.Connection, merchant_id: str) -> str | None:
    return conn.execute(
        sa.select(merchants.c.time_zone).where(merchants.c.merchant_id == merchant_id)
    ).scalar_one_or_none()


def projector_positions(
    conn: sa.Connection, topic: str
) -> Sequence[tuple[datetime | None, datetime | None]]:
    """``(last_event_at, caught_up_at)`` of every partition the projector has stored."""
    rows = conn.execute(
        sa.select(projector_offsets.c.last_event_at, projector_offsets.c.caught_up_at).where(
            projector_offsets.c.topic == topic
        )
    )
    return [(last, caught) for last, caught in rows]


def merchant_payments_where(
    merchant_id: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    status: str | None = None,
    method: str | None = None,
    user_id: str | None = None,
    store_id: str | None = None,
    min_amount: int | None = None,
    max_amount: int | None = None,
) -> list[Condition]:
    """Conditions selecting a merchant's payments: the merchant, then optional filters.

    ``start`` / ``end`` bound ``created_at`` as ``[start, end)`` and narrow the index range;
    the other filters are checked on the rows the index yields.
    """
    c = payments.c
    where: list[Condition] = [c.merchant_id == merchant_id]
    if start is not None:
        where.append(c.created_at >= start)
    if end is not None:
        where.append(c.created_at < end)
    if status is not None:
        where.append(c.status == status)
    if method is not None:
        where.append(c.method == method)
    if user_id is not None:
        where.append(c.user_id == user_id)
    if store_id is not None:
        where.append(c.store_id == store_id)
    if min_amount is not None:
        where.append(c.captured_amount >= min_amount)
    if max_amount is not None:
        where.append(c.captured_amount <= max_amount)
    return where


def user_payments_where(user_id: str) -> list[Condition]:
    return [payments.c.user_id == user_id]


def after(position: Position) -> Condition:
    """Rows strictly after ``position`` in the list order.

    Spelled ``created_at <= t AND (created_at < t OR payment_id < id)`` rather than as a row
    value or a plain OR: the first term bounds the index range scan on every engine, and the
    second only filters the few rows that share ``t``.
    """
    return sa.and_(
        payments.c.created_at <= position.created_at,
        sa.or_(
            payments.c.created_at < position.created_at,
            payments.c.payment_id < position.payment_id,
        ),
    )


def payments_page(
    conn: sa.Connection,
    where: Sequence[Condition],
    *,
    after_position: Position | None,
    limit: int,
) -> Sequence[sa.Row[Any]]:
    """Up to ``limit`` payments matching ``where``, newest first, after ``after_position``."""
    conditions = list(where)
    query = sa.select(payments)
    if after_position is not None:
        conditions.append(after(after_position))
        index = _list_index(where)
        if index is not None:
            # MariaDB reads a page after a cursor with ``ref`` on the merchant (or user)
            # alone, walking back from the newest row: page k read ~50·k rows (the 1,001st
            # page of a merchant with 300,000 payments: 50,052 rows, 76 ms). Forced to this
            # index it takes the range that starts at the cursor (52 rows). Measured with
            # ANALYZE under bench.queries; the plain form is fine on SQLite.
            query = query.with_hint(payments, f"FORCE INDEX ({index})", "mysql")
    return conn.execute(
        query.where(*conditions)
        .order_by(payments.c.created_at.desc(), payments.c.payment_id.desc())
        .limit(limit)
    ).all()


def _index_led_by(column: str) -> str | None:
    for index in payments.indexes:
        if index.name and [c.name for c in index.columns] == [column, "created_at", "payment_id"]:
            return str(index.name)
    return None


_LIST_INDEXES = {column: _index_led_by(column) for column in ("merchant_id", "user_id")}


def _list_index(where: Sequence[Condition]) -> str | None:
    """The list index a page of ``where`` walks: its first condition is the merchant's or the
    user's equality (``merchant_payments_where``, ``user_payments_where``). None when another
    condition names a user too (a merchant's payments of one user): the user's index may then
    be the better walk, and the optimizer chooses."""
    columns = [getattr(getattr(c, "left", None), "key", None) for c in where]
    if not columns or not isinstance(columns[0], str):
        return None
    if columns[0] != "user_id" and "user_id" in columns[1:]:
        return None
    return _LIST_INDEXES.get(columns[0])


def count_up_to(conn: sa.Connection, where: Sequence[Condition], cap: int) -> int:
    """How many payments match, counting no further than ``cap``: the cost stays bounded."""
    matching = sa.select(sa.literal(1)).select_from(payments).where(*where).limit(cap).subquery()
    return int(conn.execute(sa.select(sa.func.count()).select_from(matching)).scalar_one())


def wallet(conn: sa.Connection, user_id: str) -> sa.Row[Any] | None:
    """The user's wallet as the projector last applied it (a primary-key read)."""
    return conn.execute(sa.select(wallets).where(wallets.c.user_id == user_id)).first()


def statement_page(
    conn: sa.Connection, user_id: str, *, before_version: int | None, limit: int
) -> Sequence[sa.Row[Any]]:
    """Up to ``limit`` of the user's wallet movements, newest first, older than
    ``before_version``: one range scan of the primary key."""
    m = wallet_movements.c
    query = sa.select(wallet_movements).where(m.user_id == user_id)
    if before_version is not None:
        query = query.where(m.version < before_version)
    return conn.execute(query.order_by(m.version.desc()).limit(limit)).all()


def reconciliation_runs_page(
    conn: sa.Connection, *, before: int | None, limit: int
) -> Sequence[sa.Row[Any]]:
    """Recorded reconciliation runs, newest first, keyset-paged on the run id."""
    query = sa.select(reconciliation_runs).order_by(reconciliation_runs.c.run_id.desc())
    if before is not None:
        query = query.where(reconciliation_runs.c.run_id < before)
    return conn.execute(query.limit(limit)).all()


def reconciler_verified_up_to(conn: sa.Connection) -> dict[str, str | None] | None:
    """How far each reconciler check is verified (the state row's JSON; None: never)."""
    stored: dict[str, str | None] | None = conn.execute(
        sa.select(reconciler_state.c.verified_up_to)
    ).scalar()
    return stored


def reconciliation_findings_of(
    conn: sa.Connection, run_ids: Sequence[int]
) -> Sequence[sa.Row[Any]]:
    """The findings of some runs (a primary-key prefix scan per run)."""
    if not run_ids:
        return []
    return conn.execute(
        sa.select(reconciliation_findings)
        .where(reconciliation_findings.c.run_id.in_(run_ids))
        .order_by(reconciliation_findings.c.run_id, reconciliation_findings.c.seq)
    ).all()
