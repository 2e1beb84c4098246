"""``kessai.db.upsert_rows``: the multi-row statement the projector writes with, on both backends.

It hands the statement to the driver as text, so these check what SQLAlchemy used to do for it:
values converted by the column types (binary UUIDs, UTC datetimes with microseconds), hostile
strings stored as they are, replace and add on a key conflict, and a plain insert refusing a
duplicate key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai import pymysql_escapes
from kessai.db import create_db_engine, upsert_rows
from kessai.schema.read import merchant_daily_totals, payments, refunds

PAYMENT_COLUMNS = tuple(c.name for c in payments.columns)
T0 = datetime(2026, 11, 30, 23, 59, 59, 123456, tzinfo=UTC)
HOSTILE = "x'); DROP TABLE payments; -- \\ \" % %s ? 決済 \U0001f4b4 \0 \n \r \x1a \\' \\\\"


@pytest.fixture
def engine(read_db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(read_db_url, pool_size=1)
    yield engine
    engine.dispose()


def payment(
    pid: uuid.UUID, *, refunded: int = 0, version: int = 1, store: str | None = None
) -> tuple[object, ...]:
    return (
        pid, "m1", "u1", store, None, "balance", "JPY", 1000, refunded,
        "captured" if not refunded else "partially_refunded", version, "{}", T0, T0,
    )  # fmt: skip


def test_rows_round_trip_with_their_types_and_are_replaced_on_conflict(engine: Engine) -> None:
    ids = sorted(uuid.uuid4() for _ in range(3))
    with engine.begin() as conn:
        upsert_rows(conn, payments, PAYMENT_COLUMNS, [payment(i, store=HOSTILE) for i in ids],
                    replace=PAYMENT_COLUMNS[1:])  # fmt: skip
    with engine.begin() as conn:
        upsert_rows(conn, payments, PAYMENT_COLUMNS, [payment(ids[1], refunded=300, version=2)],
                    replace=PAYMENT_COLUMNS[1:])  # fmt: skip
    with engine.connect() as conn:
        rows = {r.payment_id: r for r in conn.execute(sa.select(payments))}
    assert set(rows) == set(ids)
    first = rows[ids[0]]
    assert first.store_id == HOSTILE
    assert first.created_at == T0  # aware UTC, microseconds kept
    assert first.updated_at == T0
    assert (rows[ids[1]].refunded_amount, rows[ids[1]].version) == (300, 2)
    assert rows[ids[1]].store_id is None  # replaced, not merged
    assert (rows[ids[2]].refunded_amount, rows[ids[2]].store_id) == (0, HOSTILE)


def test_every_character_mysql_escapes_round_trips_through_a_multi_row_insert(
    engine: Engine,
) -> None:
    """What PyMySQL escapes (and ``kessai.pymysql_escapes`` escapes its own way), in the
    statements the write path sends: ``executemany`` into one multi-row INSERT."""
    specials = ["\0", "\\", "\n", "\r", "\x1a", "'", '"', "\\'", "\\\\", "%s", "決済\U0001f4b4"]
    values = [*specials, "".join(specials), HOSTILE * 5]
    rows = [
        {"payment_id": uuid.uuid4(), "version": 1, "refund_id": uuid.uuid4(), "merchant_id": "m1",
         "amount": 1, "currency": "JPY", "reason": value, "created_at": T0}
        for value in values
    ]  # fmt: skip
    with engine.begin() as conn:
        if engine.dialect.driver == "pymysql":
            assert isinstance(conn.connection.dbapi_connection, pymysql_escapes.Connection)
        conn.execute(refunds.insert(), rows)
        stored = dict(conn.execute(sa.select(refunds.c.refund_id, refunds.c.reason)).all())
    assert [stored[r["refund_id"]] for r in rows] == values


def test_add_columns_sum_on_conflict(engine: Engine) -> None:
    columns = ("merchant_id", "day", "currency", "payments_count", "payments_amount",
               "refunds_count", "refunds_amount")  # fmt: skip
    totals = columns[3:]
    day = date(2026, 12, 1)
    with engine.begin() as conn:
        upsert_rows(conn, merchant_daily_totals, columns,
                    [("m1", day, "JPY", 2, 1500, 0, 0), ("m1", day, "USD", 1, 10, 0, 0)],
                    add=totals)  # fmt: skip
        upsert_rows(conn, merchant_daily_totals, columns, [("m1", day, "JPY", 1, 700, 1, 200)],
                    add=totals)  # fmt: skip
    with engine.connect() as conn:
        got = {
            r.currency: tuple(r)[3:]
            for r in conn.execute(sa.select(merchant_daily_totals).order_by("currency"))
        }
    assert got == {"JPY": (3, 2200, 1, 200), "USD": (1, 10, 0, 0)}


def test_a_plain_insert_refuses_a_duplicate_key_and_writes_nothing(engine: Engine) -> None:
    columns = tuple(c.name for c in refunds.columns)
    pid = uuid.uuid4()
    row = (pid, 2, uuid.uuid4(), "m1", 100, "JPY", None, T0)
    with engine.begin() as conn:
        upsert_rows(conn, refunds, columns, [row])
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        upsert_rows(
            conn, refunds, columns, [(pid, 3, uuid.uuid4(), "m1", 50, "JPY", None, T0), row]
        )
    with engine.connect() as conn:
        assert conn.execute(sa.select(refunds.c.version)).scalars().all() == [2]


def test_nothing_to_write_sends_nothing(engine: Engine) -> None:
    with engine.begin() as conn:
        upsert_rows(conn, payments, PAYMENT_COLUMNS, [], replace=PAYMENT_COLUMNS[1:])
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(payments)).scalar_one() == 0
