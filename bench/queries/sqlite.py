"""``bench.queries`` on the embedded default (``--db-url sqlite``): the read side in a SQLite file.

MariaDB generates the data set itself (``INSERT ... SELECT`` over its Sequence engine, columns
from CRC32 of the sequence number); SQLite has neither that engine nor CRC32, so this computes
the same columns from the same hashes (``zlib.crc32`` of the same text) in Python, payment after
payment, and loads them with the stdlib driver's ``executemany`` in one transaction per
``CHUNK`` payments: for the same seed, size and time span the rows are the ones MariaDB makes.
The payments' secondary indexes are dropped while loading and created again afterwards with the
migration's own statements (``sqlite_master``); the day and hour totals are summed in each
merchant's zone as the loader's SQL does. No ``ANALYZE``: a SQLite read database written by the
projector has no statistics either, so the query planner works as it does for ``kessai up``.
"""

from __future__ import annotations

import sqlite3
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from bench.queries.dataset import (
    PAYMENT_COLUMNS,
    REFUND_COLUMNS,
    TOTAL_COLUMNS,
    Shape,
    Span,
    merchant_ids,
    offset_minutes,
    slots,
    zone_names,
)
from bench.reconciler import insert_sql, sqlite_rows, sqlite_value

if TYPE_CHECKING:
    from rich.progress import Progress

    from bench.stores import Stores
    from kessai.settings import Settings

CHUNK = 100_000
"""Payments per load transaction."""
HOUR_US = 3_600_000_000
EPOCH = datetime.fromtimestamp(0, UTC).replace(tzinfo=None)
TABLES = ("payments", "refunds", "merchant_daily_totals", "merchant_hourly_totals")


def _uuid7(span: Span, at_us: int, i: int, tail: int) -> bytes:
    """As the loader's ``uuid7_sql``: the milliseconds, version 7, 12 hashed bits, the
    variant, ``tail`` in the low 60 bits."""
    return bytes.fromhex(f"{span.start_ms + at_us // 1000:012x}7{i:03x}8{tail:015x}")


def generate(
    shape: Shape, span: Span, first: int, last: int, slot_owner: list[str]
) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[int, int, bool]]]]:
    """Payments ``first`` to ``last`` (sequence numbers), each as (payments row, refunds rows,
    its events as (microseconds after the start, amount, is a refund)): the columns of the
    loader's ``generated``, ``payments_sql`` and ``refunds_sql``, computed the same way."""
    start = span.start.replace(tzinfo=None)
    step, span_us = span.step_us, span.span_us
    prefix = f"{shape.seed}:"
    for seq in range(first, last + 1):

        def h(tag: str, seq: int = seq) -> int:
            return zlib.crc32(f"{prefix}{tag}:{seq}".encode())

        merchant = slot_owner[h("m") % len(slot_owner)]
        at_us = (seq - 1) * step + h("t") % step
        amount = 100 + h("a") % 49901
        hu, hx, hr = h("u"), h("x"), h("r")
        if hr % 100 >= shape.refund_percent:
            r1 = 0
        elif (hr // 100) % 2 == 0:
            r1 = amount
        else:
            r1 = 1 + h("q") % (amount - 1)
        t1 = min(at_us + 1_000_000 + (h("y") % 86400) * 1_000_000, span_us)
        if r1 == 0 or r1 == amount or (hr // 200) % shape.second_refund_one_in != 0:
            r2 = 0
        else:
            r2 = 1 + h("w") % (amount - r1)
        t2 = min(t1 + 1_000_000 + (h("z") % 86400) * 1_000_000, span_us)
        i = h("i") % 4096
        payment_id = _uuid7(span, at_us, i, seq * 4)
        currency = "USD" if (hx // 4000) % 100 < shape.usd_percent else "JPY"
        status = "captured" if r1 == 0 else "partially_refunded" if r1 + r2 < amount else "refunded"
        last_us = t2 if r2 > 0 else t1 if r1 > 0 else at_us
        payment = (
            payment_id, merchant, f"u{hu % shape.users}",
            f"s{(hx // 2) % 20}" if hx % 2 == 0 else None,
            f"order-{seq - 1}" if (hx // 40) % 10 < 7 else None,
            "card" if (hx // 400) % 10 < 4 else "balance",
            currency, amount, r1 + r2, status, 1 + (r1 > 0) + (r2 > 0),
            '{"campaign":"tv-2026"}' if (hx // 400000) % 10 == 0 else "{}",
            start + timedelta(microseconds=at_us), start + timedelta(microseconds=last_us),
        )  # fmt: skip
        refunds = []
        events = [(at_us, amount, False)]
        for version, refunded, at, reason in (
            (2, r1, t1, ("damaged", "cancelled", None)[(hr // 1000) % 3]),
            (3, r2, t2, None),
        ):
            if refunded > 0:
                refunds.append(
                    (
                        payment_id, version, _uuid7(span, at, i, seq * 4 + version), merchant,
                        refunded, currency, reason, start + timedelta(microseconds=at),
                    )
                )  # fmt: skip
                events.append((at, refunded, True))
        yield payment, refunds, events


def load(
    shape: Shape, stores: Stores, read_db: str, settings: Settings, progress: Progress
) -> dict[str, Any]:
    """Load the read side into the SQLite file of ``read_db``; what was loaded and how long
    it took (the keys of the MariaDB loader's answer)."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    span = Span(start=end - timedelta(days=shape.days), end=end, payments=shape.payments)
    zones = zone_names(shape.merchants)
    local = _Local(shape, span, settings, zones)
    hourly: dict[tuple[str, int, str], list[int]] = {}
    timings = {"rows_seconds": 0.0, "totals_seconds": 0.0}
    task = progress.add_task("loading payments and refunds", total=shape.payments)
    conn = stores.connect(read_db)
    try:
        cur = conn.cursor()
        cur.executemany(
            insert_sql("merchants", ("merchant_id", "time_zone"), "?"), sorted(zones.items())
        )
        conn.commit()
        schema_before = _schema(cur)
        indexes = [
            (name, sql)
            for name, sql in cur.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                " AND tbl_name = 'payments' AND sql IS NOT NULL ORDER BY name"
            )
        ]
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        conn.commit()
        for first in range(1, shape.payments + 1, CHUNK):
            last = min(shape.payments, first + CHUNK - 1)
            started = time.perf_counter()
            _load_chunk(cur, local, first, last, hourly)
            conn.commit()
            timings["rows_seconds"] += time.perf_counter() - started
            progress.update(task, completed=last)
        started = time.perf_counter()
        progress.update(task, description="building the payments' indexes", total=None)
        for _, sql in indexes:
            cur.execute(sql)
        conn.commit()
        if _schema(cur) != schema_before:
            raise RuntimeError("the payments table differs from its migrated form after loading")
        timings["indexes_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        progress.update(task, description="computing the day and hour totals")
        _write_totals(cur, hourly)
        _write_offsets(cur, shape, settings, end)
        conn.commit()
        timings["totals_seconds"] += time.perf_counter() - started
        # The query API then reads the tables, not a long write-ahead log.
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cur.close()
    finally:
        conn.close()
    progress.remove_task(task)
    return {
        "start": span.start.isoformat(),
        "end": span.end.isoformat(),
        **{k: round(v, 2) for k, v in timings.items()},
    }


class _Local:
    """What placing a payment in its merchant's local hour needs: the merchants' slots and
    their zones' offsets over the span."""

    def __init__(self, shape: Shape, span: Span, settings: Settings, zones: dict[str, str]):
        offsets = {
            name: offset_minutes(name, span.start, span.end)
            for name in {settings.default_merchant_time_zone, *zones.values()}
        }
        default = offsets[settings.default_merchant_time_zone]
        self.shape, self.span = shape, span
        self.offset_us = {
            m: (offsets[zones[m]] if m in zones else default) * 60_000_000
            for m in merchant_ids(shape.merchants)
        }
        self.slot_owner = [merchant for _, merchant in sorted(slots(shape))]
        self.start_us = int(span.start.timestamp()) * 1_000_000


def _load_chunk(
    cur: sqlite3.Cursor,
    local: _Local,
    first: int,
    last: int,
    hourly: dict[tuple[str, int, str], list[int]],
) -> None:
    """Insert payments ``first`` to ``last`` and their refunds; add them to ``hourly``."""
    payments: list[tuple[Any, ...]] = []
    refunds: list[tuple[Any, ...]] = []
    for payment, mine, events in generate(local.shape, local.span, first, last, local.slot_owner):
        payments.append(payment)
        refunds += mine
        merchant, currency = payment[1], payment[6]
        for at, amount, refund in events:
            hour = (local.start_us + at + local.offset_us[merchant]) // HOUR_US
            sums = hourly.setdefault((merchant, hour, currency), [0, 0, 0, 0])
            index = 2 if refund else 0
            sums[index] += 1
            sums[index + 1] += amount
    cur.executemany(insert_sql("payments", PAYMENT_COLUMNS, "?"), sqlite_rows(payments))
    cur.executemany(
        insert_sql("refunds", REFUND_COLUMNS, "?"),
        sqlite_rows(sorted(refunds, key=lambda r: r[:2])),
    )


def _write_totals(cur: sqlite3.Cursor, hourly: dict[tuple[str, int, str], list[int]]) -> None:
    """The hour totals, and the day totals summed from them."""
    daily: dict[tuple[str, date, str], list[int]] = {}
    hours = []
    for (merchant, hour, currency), sums in sorted(hourly.items()):
        moment = EPOCH + timedelta(hours=hour)
        hours.append((merchant, moment, currency, *sums))
        day = daily.setdefault((merchant, moment.date(), currency), [0, 0, 0, 0])
        for n, value in enumerate(sums):
            day[n] += value
    for table, bucket, rows in (
        ("merchant_hourly_totals", "hour", hours),
        ("merchant_daily_totals", "day", [(*k, *v) for k, v in sorted(daily.items())]),
    ):
        columns = ("merchant_id", bucket, "currency", *TOTAL_COLUMNS)
        cur.executemany(insert_sql(table, columns, "?"), sqlite_rows(rows))


def _write_offsets(cur: sqlite3.Cursor, shape: Shape, settings: Settings, end: datetime) -> None:
    """The projector's positions, so answers carry a freshness like in production."""
    now = datetime.now(UTC).replace(tzinfo=None)
    cur.executemany(
        "INSERT INTO projector_offsets (topic, kafka_partition, next_offset, last_event_id,"
        " last_event_at, caught_up_at, updated_at) VALUES (?, ?, ?, NULL, ?, ?, ?)",
        sqlite_rows(
            [
                (settings.topic, p, shape.payments // settings.topic_partitions,
                 end.replace(tzinfo=None), now, now)
                for p in range(settings.topic_partitions)
            ]
        ),
    )  # fmt: skip


def _schema(cur: sqlite3.Cursor) -> list[tuple[Any, ...]]:
    return list(
        cur.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'payments' ORDER BY name"
        )
    )


def counts(read_url: str) -> dict[str, Any]:
    """``bench.queries.counts`` on SQLite: table sizes from ``dbstat`` (tables and their
    indexes, as MariaDB's data + index length), times parsed from SQLite's text."""
    engine = sa.create_engine(read_url)
    try:
        with engine.connect() as conn:

            def one(sql: str) -> Any:
                return conn.exec_driver_sql(sql).one()

            payments, first, last = one(
                "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM payments"
            )
            sizes: dict[str, int] = {}
            try:
                names = ", ".join(f"'{t}'" for t in TABLES)
                sizes = {
                    row[0]: round(int(row[1]) / 1024 / 1024)
                    for row in conn.exec_driver_sql(
                        "SELECT m.tbl_name, SUM(s.pgsize) FROM dbstat s"
                        f" JOIN sqlite_master m ON m.name = s.name WHERE m.tbl_name IN ({names})"
                        " GROUP BY m.tbl_name"
                    )
                }
            except sa.exc.OperationalError:  # a SQLite built without dbstat
                sizes = {}
            return {
                "payments": int(payments),
                "refunds": int(one("SELECT COUNT(*) FROM refunds")[0]),
                "merchants": int(
                    one("SELECT COUNT(DISTINCT merchant_id) FROM merchant_daily_totals")[0]
                ),
                "big_merchant_payments": int(
                    one("SELECT COUNT(*) FROM payments WHERE merchant_id = 'm00000'")[0]
                ),
                "daily_totals_rows": int(one("SELECT COUNT(*) FROM merchant_daily_totals")[0]),
                "hourly_totals_rows": int(one("SELECT COUNT(*) FROM merchant_hourly_totals")[0]),
                "first_payment_at": utc(first).isoformat() if first else None,
                "last_payment_at": utc(last).isoformat() if last else None,
                "table_mib": sizes,
            }
    finally:
        engine.dispose()


def utc(value: datetime | str) -> datetime:
    """A time read through the raw driver (a naive UTC ``datetime`` from PyMySQL, text from
    sqlite3) as an aware UTC datetime."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC)


__all__ = ["counts", "generate", "load", "sqlite_value", "utc"]
