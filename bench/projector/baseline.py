"""The projector bench's read databases: the raw batched upserts it measures the projector
against, and the checks of what each database holds."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from bench.projector.dataset import Effect, Expected
from bench.reconciler import (
    PAYMENT_COLUMNS,
    REFUND_COLUMNS,
    TOTAL_COLUMNS,
    insert_sql,
    process_cpu,
    sqlite_rows,
)
from bench.stores import Stores
from migrations import upgrade

# -- the read databases ------------------------------------------------------------------------


@dataclass(slots=True)
class UpsertBatch:
    payments: list[tuple[Any, ...]]
    refunds: list[tuple[Any, ...]]
    daily: list[tuple[Any, ...]]
    hourly: list[tuple[Any, ...]]


def upsert_sql(table: str, columns: Sequence[str], keys: int, *, add: bool = False) -> str:
    """Multi-row upsert: the first ``keys`` columns are the primary key; the others are
    replaced (``VALUES(c)``) or added to (``c + VALUES(c)``), as ``kessai.db.upsert`` does."""
    rest = columns[keys:]
    updates = ", ".join(
        f"`{c}` = `{c}` + VALUES(`{c}`)" if add else f"`{c}` = VALUES(`{c}`)" for c in rest
    )
    return f"{insert_sql(table, columns)} ON DUPLICATE KEY UPDATE {updates}"


def sqlite_upsert_sql(table: str, columns: Sequence[str], keys: int, *, add: bool = False) -> str:
    """The same upsert in SQLite's terms, as ``kessai.db.upsert`` writes it there: ``INSERT
    ... ON CONFLICT (primary key) DO UPDATE SET c = excluded.c`` (or ``c = t.c + excluded.c``),
    one row's values per execution of the stdlib driver's ``executemany``."""
    rest = columns[keys:]
    updates = ", ".join(
        f"`{c}` = `{table}`.`{c}` + excluded.`{c}`" if add else f"`{c}` = excluded.`{c}`"
        for c in rest
    )
    conflict = ", ".join(f"`{c}`" for c in columns[:keys])
    return f"{insert_sql(table, columns, '?')} ON CONFLICT ({conflict}) DO UPDATE SET {updates}"


DAILY_COLUMNS = ("merchant_id", "day", "currency", *TOTAL_COLUMNS)
HOURLY_COLUMNS = ("merchant_id", "hour", "currency", *TOTAL_COLUMNS)
PAYMENTS_SQL = upsert_sql("payments", PAYMENT_COLUMNS, 1)
REFUNDS_SQL = upsert_sql("refunds", REFUND_COLUMNS, 2)
DAILY_SQL = upsert_sql("merchant_daily_totals", DAILY_COLUMNS, 3, add=True)
HOURLY_SQL = upsert_sql("merchant_hourly_totals", HOURLY_COLUMNS, 3, add=True)
SQLITE_UPSERTS = (
    sqlite_upsert_sql("payments", PAYMENT_COLUMNS, 1),
    sqlite_upsert_sql("refunds", REFUND_COLUMNS, 2),
    sqlite_upsert_sql("merchant_daily_totals", DAILY_COLUMNS, 3, add=True),
    sqlite_upsert_sql("merchant_hourly_totals", HOURLY_COLUMNS, 3, add=True),
)


def upsert_batches(effects: list[list[Effect]], batch_size: int) -> list[UpsertBatch]:
    """The statements' rows, batch by batch: ``batch_size`` records at a time, partition after
    partition in offset order, each batch's rows merged (a payment's last state, its totals'
    increments summed) and sorted by primary key, as the projector writes them."""
    batches = []
    stream = itertools.chain.from_iterable(effects)
    while chunk := list(itertools.islice(stream, batch_size)):
        payments: dict[bytes, tuple[Any, ...]] = {}
        refunds = []
        daily: dict[tuple[str, date, str], list[int]] = {}
        hourly: dict[tuple[str, datetime, str], list[int]] = {}
        for e in chunk:
            payments[e.payment[0]] = e.payment
            if e.refund is not None:
                refunds.append(e.refund)
            index = 2 if e.refunded else 0
            for sums in (
                daily.setdefault((e.merchant, e.day, e.currency), [0, 0, 0, 0]),
                hourly.setdefault((e.merchant, e.hour, e.currency), [0, 0, 0, 0]),
            ):
                sums[index] += 1
                sums[index + 1] += e.amount
        batches.append(
            UpsertBatch(
                payments=[row for _, row in sorted(payments.items())],
                refunds=sorted(refunds, key=lambda r: (r[0], r[1])),
                daily=[(*k, *v) for k, v in sorted(daily.items())],
                hourly=[(*k, *v) for k, v in sorted(hourly.items())],
            )
        )
    return batches


def new_read_database(stores: Stores, name: str, zones: dict[str, str], created: list[str]) -> str:
    """A fresh, migrated read database with the merchants of other time zones; its URL."""
    stores.create(name)
    created.append(name)
    url = stores.url(name)
    upgrade("read", url)
    with stores.cursor(name) as (conn, cur):
        cur.executemany(
            insert_sql("merchants", ("merchant_id", "time_zone"), stores.param),
            sorted(zones.items()),
        )
        conn.commit()
    return url


def sqlite_batches(batches: list[UpsertBatch]) -> list[UpsertBatch]:
    """The same rows with times and days as SQLite stores them (see ``sqlite_value``)."""
    return [
        UpsertBatch(
            payments=sqlite_rows(b.payments),
            refunds=sqlite_rows(b.refunds),
            daily=sqlite_rows(b.daily),
            hourly=sqlite_rows(b.hourly),
        )
        for b in batches
    ]


def raw_upserts(
    stores: Stores, database: str, batches: list[UpsertBatch], mysqld: int | None
) -> dict[str, Any]:
    """Every batch's upserts, one transaction per batch, on one connection: PyMySQL's
    multi-row ``ON DUPLICATE KEY UPDATE``, or on SQLite the stdlib driver's ``executemany`` of
    ``ON CONFLICT DO UPDATE`` (rows converted to SQLite's text times before the clock starts).
    """
    statements = (
        SQLITE_UPSERTS if stores.sqlite else (PAYMENTS_SQL, REFUNDS_SQL, DAILY_SQL, HOURLY_SQL)
    )
    if stores.sqlite:
        batches = sqlite_batches(batches)
    with stores.cursor(database) as (conn, cur):
        if not stores.sqlite:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # as kessai's
        conn.commit()
        cpu, server, start = time.process_time(), process_cpu(mysqld), time.perf_counter()
        for batch in batches:
            for sql, rows in zip(
                statements, (batch.payments, batch.refunds, batch.daily, batch.hourly), strict=True
            ):
                if rows:
                    cur.executemany(sql, rows)
            conn.commit()
        seconds = time.perf_counter() - start
        client = time.process_time() - cpu
        server_after = process_cpu(mysqld)
    return {
        "seconds": seconds,
        "client_cpu_seconds": client,
        "server_cpu_seconds": None
        if server is None or server_after is None
        else server_after - server,
        "batches": len(batches),
        "rows": {
            "payments": sum(len(b.payments) for b in batches),
            "refunds": sum(len(b.refunds) for b in batches),
            "daily_totals": sum(len(b.daily) for b in batches),
            "hourly_totals": sum(len(b.hourly) for b in batches),
        },
    }


def read_side(stores: Stores, database: str) -> dict[str, Any]:
    """What a read database holds, in the terms of ``Expected``."""
    with stores.cursor(database) as (_, cur):
        cur.execute(
            "SELECT currency, COUNT(*), SUM(captured_amount), SUM(refunded_amount)"
            " FROM payments GROUP BY currency ORDER BY currency"
        )
        by_currency = {
            c: {"payments": int(n), "captured": int(cap), "refunded": int(ref)}
            for c, n, cap, ref in cur.fetchall()
        }
        cur.execute("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM refunds")
        refunds, refunds_amount = cur.fetchone() or (0, 0)
        totals = {}
        for table in ("merchant_daily_totals", "merchant_hourly_totals"):
            sums = ", ".join(f"COALESCE(SUM({c}), 0)" for c in TOTAL_COLUMNS)
            cur.execute(f"SELECT {sums} FROM {table}")
            totals[table] = [int(x) for x in cur.fetchone() or ()]
        counts = {}
        for table in ("parked_events", "dead_letters"):
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            counts[table] = int((cur.fetchone() or (0,))[0])
    return {
        "payments_by_currency": by_currency,
        "refunds": int(refunds),
        "refunds_amount": int(refunds_amount),
        "totals": totals,
        **counts,
    }


def differences(found: dict[str, Any], expected: Expected) -> list[str]:
    """How a read side differs from what the events imply (empty: it does not)."""
    want = expected.as_dict()
    wrong = []
    for key in ("payments_by_currency", "refunds", "refunds_amount"):
        if found[key] != want[key]:
            wrong.append(f"{key}: {found[key]} instead of {want[key]}")
    payments = sum(v["payments"] for v in want["payments_by_currency"].values())
    captured = sum(v["captured"] for v in want["payments_by_currency"].values())
    sums = [payments, captured, want["refunds"], want["refunds_amount"]]
    for table, got in found["totals"].items():
        if got != sums:
            wrong.append(f"{table}: sums {got} instead of {sums} (counts, amounts)")
    for table in ("parked_events", "dead_letters"):
        if found[table]:
            wrong.append(f"{found[table]} rows in {table}")
    return wrong


def row_differences(stores: Stores, one: str, other: str) -> dict[str, int]:
    """Rows of each table that are not exactly the same in both databases (either way); on
    SQLite the other file is attached to the first's connection (``IS`` for ``<=>``)."""
    tables = {
        "payments": (("payment_id",), PAYMENT_COLUMNS),
        "refunds": (("payment_id", "version"), REFUND_COLUMNS),
        "merchant_daily_totals": (
            ("merchant_id", "day", "currency"),
            ("merchant_id", "day", "currency", *TOTAL_COLUMNS),
        ),
        "merchant_hourly_totals": (
            ("merchant_id", "hour", "currency"),
            ("merchant_id", "hour", "currency", *TOTAL_COLUMNS),
        ),
    }
    found = {}
    with stores.cursor(one) as (_, cur):
        names = {one: f"`{one}`", other: f"`{other}`"}
        if stores.sqlite:
            cur.execute("ATTACH DATABASE ? AS other", (str(stores.home / f"{other}.db"),))
            names = {one: "main", other: "other"}
        for table, (keys, columns) in tables.items():
            on = " AND ".join(f"a.`{k}` = b.`{k}`" for k in keys)
            equal = "IS" if stores.sqlite else "<=>"
            same = " AND ".join(f"a.`{c}` {equal} b.`{c}`" for c in columns)
            missing = 0
            for first, second in ((names[one], names[other]), (names[other], names[one])):
                cur.execute(
                    f"SELECT COUNT(*) FROM {first}.`{table}` a LEFT JOIN {second}.`{table}` b"
                    f" ON {on} WHERE b.`{keys[0]}` IS NULL OR NOT ({same})"
                )
                missing += int((cur.fetchone() or (0,))[0])
            found[table] = missing
    return found
