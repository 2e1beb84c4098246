"""How fast the query API answers the merchant dashboard over a large read database, against
a bare GET endpoint on the same server.

``python -m bench.queries [--payments 1000000] [--connections 32] [--seconds 5] [--workers 2]
[--rate R | --rate-share 0.5] [--db-url mysql+pymysql://root@127.0.0.1:3306] [--json out.json]``

1. Creates a fresh read database and key store on the server (``kessai_bench_<hex>_r`` /
   ``_k``), migrates them with ``kessai.migrate.upgrade``, and creates one API key reading every
   merchant (``merchant:<id>:read``).
2. Loads the read side the projector would have written for ``--payments`` payments, generated
   by the server itself (``INSERT ... SELECT`` over MariaDB's Sequence engine, columns from
   CRC32 of the sequence number, so the data set is the same for the same seed): payments
   captured over ``--days`` days up to 10 minutes ago, one merchant (``m00000``) with 30% of
   them, the others a Zipf tail (``kessai.loadgen.merchant_weights``); 5% in USD; 5% refunded
   once, a fifth of the partly refunded ones a second time; ids UUIDv7-like in time order; one
   merchant in ten in Asia/Kolkata (a ``merchants`` row), the others in the default zone. The
   hour totals are grouped from the same generated columns, chunk by chunk, on an integer key
   (merchant, local hour in its zone, currency); the day totals from the hour totals. The
   payments' secondary indexes are dropped while loading and built again afterwards, exactly
   as the migration defines them.
3. Checks that the query API answers what was loaded (summaries against sums of the rows, list
   pages and a whole paged walk against the rows, a payment's refunds), and records
   ``ANALYZE`` (EXPLAIN with actual rows and times) of the statements the API issues.
4. Serves the real query API (``kessai query-api --workers N``, rate limits out of the way,
   caches as configured) and ``bench/bare_app.py``'s bare GET endpoint (no database, no key)
   with the same worker count, and drives each kind of request closed-loop over
   ``--connections`` keep-alive connections (the client of ``kessai/loadgen.py``) for
   ``--seconds`` after ``--warmup``: bare GET with a summary-sized and a page-sized body (before
   and after the others), summaries (today through the cache, today without it, 7 and 30 days
   by day, 7 days by hour) and list pages (first pages, then pages following ``next_cursor``),
   each for the big merchant and for random tail merchants.
   Right after each kind's closed-loop run, the same kind open-loop at a stated rate
   (``--rate``, or ``--rate-share`` of the req/s it just reached closed-loop: half by
   default), requests sent on schedule by ``kessai.loadgen``'s scheduler and their latency
   counted from when they were due; then the bare endpoint with the kind's body size at the
   same rate.
5. Prints req/s, latency p50/p90/p99/max per kind (closed loop: the saturation figures), their
   ratios to the bare baseline, CPU of client, API and database server, the open-loop
   latencies beside the bare endpoint's at the same rate, the API processes' peak RSS
   (``VmHWM``), the targets against the open-loop p99, and the machine; writes them as JSON
   with ``--json``; drops the databases (unless ``--keep``), also on failure and Ctrl-C.
   ``--reuse NAME`` measures a kept read database again.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs it on the embedded default: the read database
and the key store are SQLite files in a temporary directory, removed at the end; the same rows
are computed in Python and loaded through the stdlib ``sqlite3`` driver
(``bench/queries_sqlite.py``); SQLite's ``EXPLAIN QUERY PLAN`` stands for ``ANALYZE`` (no
actual rows or times); there is no database CPU or connection count (SQLite runs inside the
query API's workers); ``--keep`` and ``--reuse`` need a server.

``--profile FILE --profile-kind KEY`` samples the query API processes with py-spy
(``pip install py-spy``) during one kind's measured run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Protocol
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
import typer
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import event

from bench.reconciler import (
    DEFAULT_DB_URL,
    connect,
    drop_database,
    machine_table,
    process_cpu,
)
from bench.stores import Stores, temporary_home
from bench.writes import UNLIMITED, Served, served
from kessai import loadgen
from kessai.auth import create_key, merchant_scope
from kessai.broker import free_port
from kessai.db import create_db_engine
from kessai.migrate import upgrade
from kessai.schema.read import payments as payments_table
from kessai.settings import Settings
from query_service import repository
from query_service.cursor import Position
from query_service.engine import create_read_only_engine

TARGETS = {"summary_p99_ms": 20.0, "list_p99_ms": 30.0, "at_payments": 10_000_000}
"""At 10,000,000 payments: summary p99 < 20 ms, list page p99 < 30 ms."""
SLOTS = 65_536
"""Merchants are drawn by CRC32 modulo this many slots, each slot owned by one merchant in
proportion to its weight (the smallest tail merchant of 2,000 still owns about 3 slots)."""
OTHER_ZONE = "Asia/Kolkata"
"""No daylight saving time: local buckets are a fixed offset from UTC, computed on the server."""
CHUNK = 1_000_000
"""Payments per INSERT ... SELECT statement while loading."""
SMALL_BODY_ITEMS = 3
"""Items of the bare baseline's summary-sized body (about 1.2 KB)."""
PAGE_SIZE = 50
"""The list's default page size."""
RATE_SHARE = 0.5
"""Open loop, by default, at half the rate the kind reached closed-loop in the same run."""
OPEN_LOOP_REQUESTS = 1_000
"""Requests an open-loop run aims at (its p99 then rests on the ten slowest or more)."""

console = Console(width=None if sys.stdout.isatty() else 120)


# -- the data set ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    payments: int
    seed: int = 7
    days: int = 30
    big_merchant_share: float = 0.3
    usd_percent: int = 5
    refund_percent: int = 5
    """Payments refunded at least once (version 2), in percent."""
    second_refund_one_in: int = 5
    """One in this many partly refunded payments is refunded again (version 3)."""

    @property
    def merchants(self) -> int:
        return max(10, min(2_000, self.payments // 500))

    @property
    def users(self) -> int:
        return max(10, self.payments // 5)


def merchant_id(rank: int) -> str:
    """The data set's merchant of popularity ``rank``; ``m00000`` is the big one. Its own names,
    not the load generator's (``shop-1``...): the queries below name the big merchant, and
    results stay comparable with earlier runs."""
    return f"m{rank:05d}"


def merchant_ids(count: int) -> list[str]:
    return [merchant_id(i) for i in range(count)]


def zone_names(count: int) -> dict[str, str]:
    """Merchants with a ``merchants`` row: every tenth but the big one, in ``OTHER_ZONE``."""
    return {m: OTHER_ZONE for i, m in enumerate(merchant_ids(count)) if in_other_zone(i)}


def slots(shape: Shape) -> list[tuple[int, str]]:
    """(slot, merchant): merchant 0 owns ``big_merchant_share`` of the slots, the others a
    Zipf tail, as the load generator draws them."""
    cumulative = loadgen.merchant_weights(
        loadgen.Mix(merchants=shape.merchants, hot_share=shape.big_merchant_share)
    )
    ids = merchant_ids(shape.merchants)
    out, rank = [], 0
    for slot in range(SLOTS):
        middle = (slot + 0.5) / SLOTS * cumulative[-1]
        while cumulative[rank] < middle:
            rank += 1
        out.append((slot, ids[rank]))
    return out


def offset_minutes(zone: str, start: datetime, end: datetime) -> int:
    """The zone's UTC offset, which must not change over ``[start, end]`` (fixed offsets only:
    the server has no time zone tables)."""
    tz = ZoneInfo(zone)
    first, last = start.astimezone(tz).utcoffset(), end.astimezone(tz).utcoffset()
    if first is None or first != last:
        raise RuntimeError(f"{zone} changes its offset between {start} and {end}")
    return int(first.total_seconds() // 60)


@dataclass(frozen=True, slots=True)
class Span:
    """The loaded data's time range (UTC) and the sizes the SQL needs."""

    start: datetime
    end: datetime
    payments: int

    @property
    def span_us(self) -> int:
        return int((self.end - self.start).total_seconds()) * 1_000_000

    @property
    def step_us(self) -> int:
        return max(1, self.span_us // self.payments)

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp()) * 1000

    @property
    def start_sql(self) -> str:
        return self.start.strftime("'%Y-%m-%d %H:%M:%S'")


def _hash(shape: Shape, tag: str) -> str:
    return f"CRC32(CONCAT('{shape.seed}:{tag}:', seq))"


def generated(shape: Shape, span: Span, first: int, last: int) -> str:
    """A derived table ``g`` of payments ``first`` to ``last`` (sequence numbers): ``seq``,
    ``slot``, ``at_us`` (microseconds after the start), ``amount``, hashes ``hu`` (user) and
    ``hx`` (the other columns), ``hr`` (refund draw); the first refund's amount ``r1`` and time
    ``t1``, the second's ``r2`` and ``t2`` (0 amount: none)."""

    def h(tag: str) -> str:
        return _hash(shape, tag)

    base = (
        f"SELECT seq, {h('m')} MOD {SLOTS} AS slot,"
        f" (seq - 1) * {span.step_us} + {h('t')} MOD {span.step_us} AS at_us,"
        f" 100 + {h('a')} MOD 49901 AS amount, {h('u')} AS hu, {h('x')} AS hx, {h('r')} AS hr"
        f" FROM seq_{first}_to_{last}"
    )
    first_refund = (
        f"SELECT g1.*, CASE WHEN hr MOD 100 >= {shape.refund_percent} THEN 0"
        f" WHEN (hr DIV 100) MOD 2 = 0 THEN amount"
        f" ELSE 1 + {h('q')} MOD (amount - 1) END AS r1,"
        f" LEAST(at_us + 1000000 + ({h('y')} MOD 86400) * 1000000, {span.span_us}) AS t1"
        f" FROM ({base}) g1"
    )
    return (
        f"SELECT g2.*, CASE WHEN r1 = 0 OR r1 = amount"
        f" OR (hr DIV 200) MOD {shape.second_refund_one_in} <> 0 THEN 0"
        f" ELSE 1 + {h('w')} MOD (amount - r1) END AS r2,"
        f" LEAST(t1 + 1000000 + ({h('z')} MOD 86400) * 1000000, {span.span_us}) AS t2"
        f" FROM ({first_refund}) g2"
    )


def uuid7_sql(span: Span, shape: Shape, at_us: str, tail: str) -> str:
    """A UUIDv7-like 16-byte id: the milliseconds of ``at_us``, version 7, 12 pseudo-random
    bits, the variant, and ``tail`` (unique per row) in the low 60 bits."""
    return (
        f"UNHEX(CONCAT(LPAD(HEX({span.start_ms} + {at_us} DIV 1000), 12, '0'), '7',"
        f" LPAD(HEX({_hash(shape, 'i')} MOD 4096), 3, '0'), '8', LPAD(HEX({tail}), 15, '0')))"
    )


def at_sql(span: Span, at_us: str) -> str:
    return f"TIMESTAMPADD(MICROSECOND, {at_us}, {span.start_sql})"


PAYMENT_COLUMNS = (
    "payment_id", "merchant_id", "user_id", "store_id", "order_ref", "method", "currency",
    "captured_amount", "refunded_amount", "status", "version", "metadata", "created_at",
    "updated_at",
)  # fmt: skip
REFUND_COLUMNS = (
    "payment_id", "version", "refund_id", "merchant_id", "amount", "currency", "reason",
    "created_at",
)  # fmt: skip
TOTAL_COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


def payments_sql(shape: Shape, span: Span, first: int, last: int) -> str:
    currency = f"IF((hx DIV 4000) MOD 100 < {shape.usd_percent}, 'USD', 'JPY')"
    values = (
        uuid7_sql(span, shape, "at_us", "seq * 4"),
        "s.merchant_id",
        f"CONCAT('u', hu MOD {shape.users})",
        "IF(hx MOD 2 = 0, CONCAT('s', (hx DIV 2) MOD 20), NULL)",
        "IF((hx DIV 40) MOD 10 < 7, CONCAT('order-', seq - 1), NULL)",
        "IF((hx DIV 400) MOD 10 < 4, 'card', 'balance')",
        currency,
        "amount",
        "r1 + r2",
        "CASE WHEN r1 = 0 THEN 'captured' WHEN r1 + r2 < amount THEN 'partially_refunded'"
        " ELSE 'refunded' END",
        "1 + (r1 > 0) + (r2 > 0)",
        """IF((hx DIV 400000) MOD 10 = 0, '{"campaign":"tv-2026"}', '{}')""",
        at_sql(span, "at_us"),
        at_sql(span, "CASE WHEN r2 > 0 THEN t2 WHEN r1 > 0 THEN t1 ELSE at_us END"),
    )
    return (
        f"INSERT INTO payments ({', '.join(PAYMENT_COLUMNS)}) SELECT {', '.join(values)}"
        f" FROM ({generated(shape, span, first, last)}) g"
        " JOIN bench_slots s ON s.slot = g.slot ORDER BY g.seq"
    )


def refunds_sql(shape: Shape, span: Span, first: int, last: int, version: int) -> str:
    amount, at = ("r1", "t1") if version == 2 else ("r2", "t2")
    reason = (
        "ELT(1 + (hr DIV 1000) MOD 3, 'damaged', 'cancelled', NULL)" if version == 2 else "NULL"
    )
    values = (
        uuid7_sql(span, shape, "at_us", "seq * 4"),
        str(version),
        uuid7_sql(span, shape, at, f"seq * 4 + {version}"),
        "s.merchant_id",
        amount,
        f"IF((hx DIV 4000) MOD 100 < {shape.usd_percent}, 'USD', 'JPY')",
        reason,
        at_sql(span, at),
    )
    return (
        f"INSERT INTO refunds ({', '.join(REFUND_COLUMNS)}) SELECT {', '.join(values)}"
        f" FROM ({generated(shape, span, first, last)}) g"
        f" JOIN bench_slots s ON s.slot = g.slot WHERE {amount} > 0 ORDER BY g.seq"
    )


HOUR_US = 3_600_000_000


def hour_totals_sql(shape: Shape, span: Span, first: int, last: int) -> str:
    """Add the hour totals of payments ``first`` to ``last`` (sequence numbers) and of their
    refunds to ``merchant_hourly_totals``, computed from the generated columns as the rows are:
    a payment counts in the local hour of its capture, a refund in its own (as the projector
    does). Each event is grouped on one integer, (merchant rank, local hour, USD or not), the
    local hour counted from a day before the start (the zone's offset is fixed); merchant,
    hour and currency are written out once per group. Chunks meet in hours both hold, and
    refunds fall up to a day after their payment, so rows already there are added to."""
    start_us = int(span.start.timestamp()) * 1_000_000
    base_hour = start_us // HOUR_US - 24
    hours = 1_000_000  # local hours per merchant rank in the key: far more than the span

    def event(at: str, amount: str, where: str = "") -> str:
        hour = f"({start_us} + {at} + s.offset_minutes * 60000000) DIV {HOUR_US} - {base_hour}"
        usd = f"((hx DIV 4000) MOD 100 < {shape.usd_percent})"
        return (
            f"SELECT (s.merchant_rank * {hours} + {hour}) * 2 + {usd} AS k, COUNT(*) AS n,"
            f" SUM({amount}) AS amount FROM ({generated(shape, span, first, last)}) g"
            f" JOIN bench_slots s ON s.slot = g.slot{where} GROUP BY k"
        )

    payments, first_refunds, second_refunds = (
        event("at_us", "amount"),
        event("t1", "r1", " WHERE r1 > 0"),
        event("t2", "r2", " WHERE r2 > 0"),
    )
    return (
        "INSERT INTO merchant_hourly_totals (merchant_id, hour, currency, payments_count,"
        " payments_amount, refunds_count, refunds_amount)"
        f" SELECT m.merchant_id, TIMESTAMPADD(HOUR, {base_hour} + (k DIV 2) MOD {hours},"
        " '1970-01-01 00:00:00'), IF(k MOD 2 = 1, 'USD', 'JPY'),"
        " SUM(pn), SUM(pa), SUM(rn), SUM(ra)"
        f" FROM (SELECT k, n AS pn, amount AS pa, 0 AS rn, 0 AS ra FROM ({payments}) p"
        f" UNION ALL SELECT k, 0, 0, n, amount FROM ({first_refunds}) r1"
        f" UNION ALL SELECT k, 0, 0, n, amount FROM ({second_refunds}) r2) e"
        f" JOIN bench_merchants m ON m.merchant_rank = k DIV {2 * hours} GROUP BY k"
        " ON DUPLICATE KEY UPDATE payments_count = payments_count + VALUES(payments_count),"
        " payments_amount = payments_amount + VALUES(payments_amount),"
        " refunds_count = refunds_count + VALUES(refunds_count),"
        " refunds_amount = refunds_amount + VALUES(refunds_amount)"
    )


DAY_TOTALS_SQL = (
    "INSERT INTO merchant_daily_totals (merchant_id, day, currency, payments_count,"
    " payments_amount, refunds_count, refunds_amount)"
    " SELECT merchant_id, DATE(hour) AS d, currency, SUM(payments_count), SUM(payments_amount),"
    " SUM(refunds_count), SUM(refunds_amount) FROM merchant_hourly_totals"
    " GROUP BY merchant_id, d, currency"
)


def load(
    shape: Shape, server_url: str, read_db: str, settings: Settings, progress: Progress
) -> dict[str, Any]:
    """Generate the read side on the server; return what was loaded and how long it took."""
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    span = Span(start=end - timedelta(days=shape.days), end=end, payments=shape.payments)
    zones = zone_names(shape.merchants)
    offsets = {
        name: offset_minutes(name, span.start, span.end)
        for name in {settings.default_merchant_time_zone, *zones.values()}
    }
    timings: dict[str, float] = {}
    task = progress.add_task("loading", total=None)
    with connect(server_url, read_db) as conn, conn.cursor() as cur:
        conn.autocommit(True)
        cur.execute("SET SESSION tmp_table_size = 1073741824, max_heap_table_size = 1073741824")
        cur.execute("SET SESSION unique_checks = 0, foreign_key_checks = 0")
        # In memory: every generated row looks its slot up (three times as fast as InnoDB).
        merchant = "merchant_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL"
        cur.execute(
            f"CREATE TABLE bench_slots (slot INT PRIMARY KEY, {merchant}, merchant_rank INT"
            " NOT NULL, offset_minutes INT NOT NULL) ENGINE=MEMORY"
        )
        cur.execute(
            f"CREATE TABLE bench_merchants (merchant_rank INT PRIMARY KEY, {merchant})"
            " ENGINE=MEMORY"
        )
        default = offsets[settings.default_merchant_time_zone]
        rank = {m: i for i, m in enumerate(merchant_ids(shape.merchants))}
        cur.executemany(
            "INSERT INTO bench_slots VALUES (%s, %s, %s, %s)",
            [
                (slot, m, rank[m], offsets[zones[m]] if m in zones else default)
                for slot, m in slots(shape)
            ],
        )
        cur.executemany(
            "INSERT INTO bench_merchants VALUES (%s, %s)", [(i, m) for m, i in rank.items()]
        )
        cur.executemany(
            "INSERT INTO merchants (merchant_id, time_zone) VALUES (%s, %s)", sorted(zones.items())
        )
        cur.execute("SHOW CREATE TABLE payments")
        schema_before = cur.fetchone()[1]
        # The secondary indexes as the migration made them, in the table's order.
        cur.execute("SHOW INDEX FROM payments")
        indexes: dict[str, list[str]] = {}
        for row in cur.fetchall():
            if row[2] != "PRIMARY":
                indexes.setdefault(row[2], []).append(row[4])  # Key_name, Column_name
        cur.execute("ALTER TABLE payments " + ", ".join(f"DROP INDEX `{ix}`" for ix in indexes))
        timings["rows_seconds"] = timings["totals_seconds"] = 0.0
        progress.update(task, description="loading payments and refunds", total=shape.payments)
        for first in range(1, shape.payments + 1, CHUNK):
            last = min(shape.payments, first + CHUNK - 1)
            started = time.perf_counter()
            cur.execute(payments_sql(shape, span, first, last))
            for version in (2, 3):
                cur.execute(refunds_sql(shape, span, first, last, version))
            timings["rows_seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            cur.execute(hour_totals_sql(shape, span, first, last))
            timings["totals_seconds"] += time.perf_counter() - started
            progress.update(task, completed=last)
        started = time.perf_counter()
        progress.update(task, description="building the payments' indexes", total=None)
        cur.execute(
            "ALTER TABLE payments "
            + ", ".join(
                f"ADD INDEX `{ix}` ({', '.join(f'`{c}`' for c in columns)})"
                for ix, columns in indexes.items()
            )
        )
        cur.execute("SHOW CREATE TABLE payments")
        if cur.fetchone()[1] != schema_before:
            raise RuntimeError("the payments table differs from its migrated form after loading")
        timings["indexes_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        progress.update(task, description="computing the day totals")
        cur.execute(DAY_TOTALS_SQL)
        timings["totals_seconds"] += time.perf_counter() - started
        # The projector's positions, so answers carry a freshness like in production.
        now = datetime.now(UTC).replace(tzinfo=None)
        cur.executemany(
            "INSERT INTO projector_offsets (topic, kafka_partition, next_offset, last_event_id,"
            " last_event_at, caught_up_at, updated_at) VALUES (%s, %s, %s, NULL, %s, %s, %s)",
            [
                (settings.topic, p, shape.payments // settings.topic_partitions, end, now, now)
                for p in range(settings.topic_partitions)
            ],
        )
        cur.execute("DROP TABLE bench_slots, bench_merchants")
        cur.execute(
            "ANALYZE TABLE payments, refunds, merchant_daily_totals, merchant_hourly_totals"
        )
    progress.remove_task(task)
    return {
        "start": span.start.isoformat(),
        "end": span.end.isoformat(),
        **{k: round(v, 2) for k, v in timings.items()},
    }


def counts(read_url: str) -> dict[str, Any]:
    if read_url.startswith("sqlite"):
        from bench import queries_sqlite

        return queries_sqlite.counts(read_url)
    engine = sa.create_engine(read_url)
    try:
        with engine.connect() as conn:

            def one(sql: str) -> Any:
                return conn.exec_driver_sql(sql).one()

            payments, first, last = one(
                "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM payments"
            )
            merchants = one("SELECT COUNT(DISTINCT merchant_id) FROM merchant_daily_totals")[0]
            big = one("SELECT COUNT(*) FROM payments WHERE merchant_id = 'm00000'")[0]
            sizes = {
                row[0]: round(int(row[1]) / 1024 / 1024)
                for row in conn.exec_driver_sql(
                    "SELECT table_name, data_length + index_length FROM information_schema.tables"
                    " WHERE table_schema = DATABASE()"
                    " AND table_name IN ('payments', 'refunds', 'merchant_daily_totals',"
                    " 'merchant_hourly_totals')"
                )
            }
            return {
                "payments": int(payments),
                "refunds": int(one("SELECT COUNT(*) FROM refunds")[0]),
                "merchants": int(merchants),
                "big_merchant_payments": int(big),
                "daily_totals_rows": int(one("SELECT COUNT(*) FROM merchant_daily_totals")[0]),
                "hourly_totals_rows": int(one("SELECT COUNT(*) FROM merchant_hourly_totals")[0]),
                "first_payment_at": first.replace(tzinfo=UTC).isoformat() if first else None,
                "last_payment_at": last.replace(tzinfo=UTC).isoformat() if last else None,
                "table_mib": sizes,
            }
    finally:
        engine.dispose()


# -- the sanity check --------------------------------------------------------------------------


class Client:
    """Blocking GETs against a served API, for the checks (not for measuring)."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def get(self, path: str, **params: Any) -> Any:
        query = urlencode({k.rstrip("_"): v for k, v in params.items() if v is not None})
        request = urllib.request.Request(
            f"{self.url}{path}{'?' + query if query else ''}",
            headers={"Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return orjson.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET {path} {params}: {exc.code} {exc.read()[:500]!r}") from None


def in_other_zone(rank: int) -> bool:
    """As ``zone_names``: every tenth merchant but the big one."""
    return rank > 0 and rank % 10 == 0


def zone_of(merchant: str, settings: Settings) -> ZoneInfo:
    other = in_other_zone(int(merchant[1:]))
    return ZoneInfo(OTHER_ZONE if other else settings.default_merchant_time_zone)


def check(client: Client, read_url: str, settings: Settings, merchants: int) -> dict[str, Any]:
    """The query API answers what was loaded; raises otherwise. Returns what was compared."""
    engine = sa.create_engine(read_url)
    compared: dict[str, Any] = {"summaries": [], "pages": 0, "walked_payments": 0}
    p = "?" if engine.dialect.name == "sqlite" else "%s"  # the raw driver's parameters
    try:
        with engine.connect() as conn:
            picks = ["m00000", merchant_id(1), merchant_id(10)]
            picks += [merchant_id(merchants - 1), merchant_id(merchants // 2 + 1)]
            for merchant in dict.fromkeys(picks):
                zone = zone_of(merchant, settings)
                (first,) = conn.exec_driver_sql(
                    f"SELECT MIN(created_at) FROM payments WHERE merchant_id = {p}",
                    (merchant,),
                ).one()
                if first is None:
                    continue
                today = datetime.now(zone).date()
                if isinstance(first, str):  # SQLite's text
                    first = datetime.fromisoformat(first)
                start = first.replace(tzinfo=UTC).astimezone(zone).date()
                # Every row: payments of the merchant, refunds of the merchant (all in range).
                expected: dict[str, dict[str, int]] = {}
                for currency, n, amount in conn.exec_driver_sql(
                    "SELECT currency, COUNT(*), SUM(captured_amount) FROM payments"
                    f" WHERE merchant_id = {p} GROUP BY currency",
                    (merchant,),
                ):
                    expected.setdefault(currency, dict.fromkeys(TOTAL_COLUMNS, 0)).update(
                        payments_count=int(n), payments_amount=int(amount)
                    )
                for currency, n, amount in conn.exec_driver_sql(
                    "SELECT currency, COUNT(*), SUM(amount) FROM refunds"
                    f" WHERE merchant_id = {p} GROUP BY currency",
                    (merchant,),
                ):
                    expected.setdefault(currency, dict.fromkeys(TOTAL_COLUMNS, 0)).update(
                        refunds_count=int(n), refunds_amount=int(amount)
                    )
                body = client.get(
                    f"/v1/merchants/{merchant}/summary",
                    from_=start.isoformat(),
                    to=today.isoformat(),
                )
                got = {c["currency"]: {k: c[k] for k in TOTAL_COLUMNS} for c in body["currencies"]}
                if got != expected or body["time_zone"] != zone.key:
                    raise RuntimeError(
                        f"summary of {merchant} ({body['time_zone']}): {got}, rows say {expected}"
                    )
                series = sum(b["payments_count"] for c in body["currencies"] for b in c["buckets"])
                if series != sum(v["payments_count"] for v in expected.values()):
                    raise RuntimeError(f"summary of {merchant}: buckets do not add up")
                # Today by hour (the cached path) against today by day (uncached).
                hourly = client.get(f"/v1/merchants/{merchant}/summary", granularity="hour")
                daily = client.get(
                    f"/v1/merchants/{merchant}/summary",
                    from_=today.isoformat(),
                    to=today.isoformat(),
                )
                if _totals(hourly) != _totals(daily):
                    raise RuntimeError(f"today of {merchant}: by hour {hourly}, by day {daily}")
                compared["summaries"].append(
                    {"merchant": merchant, "zone": zone.key, "totals": expected}
                )
                # The first page, and the whole walk for merchants of a few thousand payments.
                rows = conn.exec_driver_sql(
                    f"SELECT payment_id FROM payments WHERE merchant_id = {p}"
                    " ORDER BY created_at DESC, payment_id DESC LIMIT 50",
                    (merchant,),
                ).all()
                page = client.get(f"/v1/merchants/{merchant}/payments")
                if [uuid.UUID(i["payment_id"]).bytes for i in page["items"]] != [
                    bytes(r[0]) for r in rows
                ]:
                    raise RuntimeError(f"first page of {merchant} differs from the rows")
                compared["pages"] += 1
                total = sum(v["payments_count"] for v in expected.values())
                if total <= 5_000:
                    seen: set[str] = set()
                    cursor = None
                    while True:
                        page = client.get(
                            f"/v1/merchants/{merchant}/payments", limit=500, cursor=cursor
                        )
                        compared["pages"] += 1
                        seen.update(i["payment_id"] for i in page["items"])
                        cursor = page["next_cursor"]
                        if cursor is None:
                            break
                    if len(seen) != total:
                        raise RuntimeError(f"walk of {merchant}: {len(seen)} of {total} payments")
                    compared["walked_payments"] += total
            # A payment refunded twice, with its refunds.
            row = conn.exec_driver_sql(
                "SELECT payment_id, refunded_amount, merchant_id FROM payments WHERE version = 3"
                " LIMIT 1"
            ).first()
            if row is not None:
                detail = client.get(f"/v1/payments/{uuid.UUID(bytes=bytes(row[0]))}")
                if (
                    len(detail["refunds"]) != 2
                    or sum(r["amount"] for r in detail["refunds"]) != row[1]
                    or detail["refunded_amount"] != row[1]
                    or detail["status"] not in ("partially_refunded", "refunded")
                ):
                    raise RuntimeError(f"payment detail differs from the rows: {detail}")
                compared["payment_detail"] = str(uuid.UUID(bytes=bytes(row[0])))
    finally:
        engine.dispose()
    return compared


def _totals(body: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {c["currency"]: {k: c[k] for k in TOTAL_COLUMNS} for c in body["currencies"]}


# -- what the API asks the database ------------------------------------------------------------


def explain(read_url: str, settings: Settings, merchants: int) -> list[dict[str, Any]]:
    """``ANALYZE`` (run, with actual rows and times) of the statements the query API issues,
    captured from ``query_service.repository`` itself."""
    engine = create_read_only_engine(read_url, pool_size=1)
    captured: list[tuple[str, Any]] = []
    # SQLite has no ANALYZE of a statement (actual rows and times): its plan only.
    analyze = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "ANALYZE"

    @event.listens_for(engine, "before_cursor_execute")
    def _capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.startswith(analyze):
            captured.append((statement, parameters))

    tail = merchant_id(min(merchants - 1, 5))
    tokyo = ZoneInfo(settings.default_merchant_time_zone)
    today = datetime.now(tokyo).date()
    out: list[dict[str, Any]] = []
    try:
        with engine.connect() as conn:

            def position_after(rows: int) -> Position | None:
                """Where the big merchant's list stands after ``rows`` rows (a cursor)."""
                found = conn.execute(
                    sa.select(payments_table.c.created_at, payments_table.c.payment_id)
                    .where(payments_table.c.merchant_id == "m00000")
                    .order_by(
                        payments_table.c.created_at.desc(), payments_table.c.payment_id.desc()
                    )
                    .offset(rows - 1)
                    .limit(1)
                ).first()
                return None if found is None else Position(found[0], found[1])

            position, deep_position = position_after(500), position_after(50_000)
            captured.clear()

            def page(merchant: str, after: Position | None, **filters: Any) -> Callable[[], object]:
                where = repository.merchant_payments_where(merchant, **filters)
                return lambda: repository.payments_page(
                    conn, where, after_position=after, limit=PAGE_SIZE + 1
                )

            cases: list[tuple[str, Callable[[], object]]] = [
                ("list, first page, big merchant", page("m00000", None)),
                ("list, 11th page (cursor), big merchant", page("m00000", position)),
                (
                    "list, 1,001st page (cursor), big merchant (not measured)",
                    page("m00000", deep_position),
                ),
                (f"list, first page, tail merchant {tail}", page(tail, None)),
                (
                    "list, status=refunded filter, big merchant (not measured)",
                    page("m00000", None, status="refunded"),
                ),
                (
                    "summary, 30 days by day, big merchant",
                    lambda: repository.totals(
                        conn,
                        "m00000",
                        granularity="day",
                        first=today - timedelta(days=29),
                        last=today,
                    ),
                ),
                (
                    "summary, 7 days by hour, big merchant",
                    lambda: repository.totals(
                        conn,
                        "m00000",
                        granularity="hour",
                        first=datetime.combine(today - timedelta(days=6), datetime.min.time()),
                        last=datetime.combine(today, datetime.min.time()) + timedelta(hours=23),
                    ),
                ),
            ]
            for name, run in cases:
                captured.clear()
                run()
                statement, parameters = captured[-1]
                # The statement alone, through the driver (the second run, warm): the
                # database's share of a request.
                timings = []
                for _ in range(3):
                    began = time.perf_counter()
                    conn.exec_driver_sql(statement, parameters).all()
                    timings.append(time.perf_counter() - began)
                result = conn.exec_driver_sql(f"{analyze} {statement}", parameters)
                columns = list(result.keys())
                plan = [dict(zip(columns, row, strict=True)) for row in result]
                for step in plan:
                    for k, v in list(step.items()):
                        if not isinstance(v, str | int | float | type(None)):
                            step[k] = str(v)
                sql = statement
                out.append(
                    {
                        "query": name,
                        "sql": " ".join(sql.split()),
                        "plan": plan,
                        "statement_ms": round(min(timings) * 1000, 2),
                    }
                )
            conn.rollback()
    finally:
        engine.dispose()
    return out


# -- the load ----------------------------------------------------------------------------------


class Picker(Protocol):
    def next(self) -> tuple[str, str]:
        """(tag, path with query) of the next request."""

    def answered(self, tag: str, status: int, body: bytes) -> None: ...


def _today(zone: ZoneInfo) -> date:
    return datetime.now(zone).date()


class Merchants:
    """Which merchant a request is for: the big one, or a tail merchant drawn uniformly."""

    def __init__(self, which: str, merchants: int, rng: random.Random, settings: Settings) -> None:
        self.which, self.count, self.rng = which, merchants, rng
        self.default = ZoneInfo(settings.default_merchant_time_zone)
        self.other = ZoneInfo(OTHER_ZONE)

    def pick(self) -> tuple[str, ZoneInfo]:
        rank = 0 if self.which == "big" else self.rng.randrange(1, self.count)
        return merchant_id(rank), self.other if in_other_zone(rank) else self.default


class SummaryPicker:
    def __init__(self, merchants: Merchants, query: Callable[[date], dict[str, str]]) -> None:
        self.merchants, self.query = merchants, query

    def next(self) -> tuple[str, str]:
        merchant, zone = self.merchants.pick()
        params = self.query(_today(zone))
        return "summary", f"/v1/merchants/{merchant}/summary" + (
            f"?{urlencode(params)}" if params else ""
        )

    def answered(self, tag: str, status: int, body: bytes) -> None:
        pass


class ListWalker:
    """First pages (``pages`` = 1), or walks of up to ``pages`` pages following
    ``next_cursor``, then another merchant."""

    MARK = b'"next_cursor":"'

    def __init__(self, merchants: Merchants, pages: int) -> None:
        self.merchants, self.pages = merchants, pages
        self.path = ""
        self.cursor: str | None = None
        self.depth = 0

    def next(self) -> tuple[str, str]:
        if self.cursor is None:
            merchant, _ = self.merchants.pick()
            self.path = f"/v1/merchants/{merchant}/payments"
            self.depth = 1
            return "first page", self.path
        self.depth += 1
        return "next page", f"{self.path}?cursor={self.cursor}"

    def answered(self, tag: str, status: int, body: bytes) -> None:
        self.cursor = None
        if status != 200 or self.depth >= self.pages:
            return
        at = body.find(self.MARK)
        if at >= 0:
            start = at + len(self.MARK)
            self.cursor = body[start : body.index(b'"', start)].decode()


class BarePicker:
    def __init__(self, items: int, merchants: Merchants) -> None:
        self.items, self.merchants = items, merchants

    def next(self) -> tuple[str, str]:
        merchant, _ = self.merchants.pick()
        return "bare", f"/v1/bare/merchants/{merchant}?items={self.items}"

    def answered(self, tag: str, status: int, body: bytes) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Kind:
    key: str
    name: str
    group: str
    """bare, summary or list: which target applies, and which bare body it is compared with."""
    merchants: str
    """big or tail."""
    picker: Callable[[Merchants], Picker]
    baseline: str
    """The key of the bare kind it is compared with."""


def _days_back(days: int, **extra: str) -> Callable[[date], dict[str, str]]:
    def query(today: date) -> dict[str, str]:
        start = today - timedelta(days=days - 1)
        return {"from": start.isoformat(), "to": today.isoformat(), **extra}

    return query


def kinds(pages: int) -> list[Kind]:
    bare_small = Kind(
        "bare-small", f"bare GET, {SMALL_BODY_ITEMS} items", "bare", "tail",
        lambda m: BarePicker(SMALL_BODY_ITEMS, m), "bare-small",
    )  # fmt: skip
    bare_page = Kind(
        "bare-page", f"bare GET, {PAGE_SIZE} items", "bare", "tail",
        lambda m: BarePicker(PAGE_SIZE, m), "bare-page",
    )  # fmt: skip
    summaries: list[tuple[str, str, Callable[[date], dict[str, str]]]] = [
        ("today", "summary today (cache)", lambda _today: {}),
        ("today-uncached", "summary today (from=to)", _days_back(1)),
        ("7d", "summary 7 d by day", _days_back(7)),
        ("30d", "summary 30 d by day", _days_back(30)),
        ("7d-hour", "summary 7 d by hour", _days_back(7, granularity="hour")),
    ]
    out = [bare_small, bare_page]
    for key, name, query in summaries:
        for which in ("big", "tail"):
            out.append(
                Kind(
                    f"summary-{key}-{which}",
                    f"{name}, {which}",
                    "summary",
                    which,
                    lambda m, q=query: SummaryPicker(m, q),  # type: ignore[misc]
                    "bare-small",
                )
            )
    for key, name, depth in (
        ("first", "list first page", 1),
        ("next", f"list walk of {pages} pages", pages),
    ):
        for which in ("big", "tail"):
            out.append(
                Kind(
                    f"list-{key}-{which}",
                    f"{name}, {which}",
                    "list",
                    which,
                    lambda m, d=depth: ListWalker(m, d),  # type: ignore[misc]
                    "bare-page",
                )
            )
    return out


@dataclass(slots=True)
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    body_bytes: int = 0
    elapsed: float = 0.0
    client_cpu_seconds: float = 0.0


async def send(
    url: str,
    key: str,
    pickers: list[Picker],
    seconds: float,
    rate: float | None = None,
    on_progress: Callable[[Tally, float], None] | None = None,
) -> Tally:
    """Each picker drives one keep-alive connection (``kessai.loadgen.drive``): closed loop
    (``rate`` None: a request when the previous one is answered) or open loop at ``rate``
    requests/s, latency counted from when each request was due."""
    host, port = url.removeprefix("http://").split(":")
    common = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\nUser-Agent: kessai-bench\r\n"
    tally = Tally()
    start, cpu = time.perf_counter(), time.process_time()

    def source(picker: Picker) -> Callable[[], loadgen.Request]:
        def request() -> loadgen.Request:
            tag, path = picker.next()

            def answered(answer: loadgen.Answer, seconds: float) -> None:
                tally.latencies.setdefault(tag, []).append(seconds)
                tally.statuses[answer.status] += 1
                tally.body_bytes += len(answer.body)
                picker.answered(tag, answer.status, answer.body)

            return loadgen.Request(f"GET {path} HTTP/1.1\r\n{common}\r\n".encode(), b"", answered)

        return request

    def failed() -> None:
        tally.connection_errors += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                on_progress(tally, time.perf_counter() - start)

    reporter = asyncio.create_task(report())
    try:
        schedule = loadgen.Schedule(rate, seconds)
        await loadgen.drive(url, schedule, [source(p) for p in pickers], failed)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    tally.elapsed = time.perf_counter() - start
    tally.client_cpu_seconds = time.process_time() - cpu
    return tally


def _ms(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 2)


def latency(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50": _ms(ordered, 0.50),
        "p90": _ms(ordered, 0.90),
        "p99": _ms(ordered, 0.99),
        "max": _ms(ordered, 1.0),
    }


@contextlib.contextmanager
def sampling(path: Path | None, pid: int) -> Iterator[None]:
    """py-spy attached to ``pid`` and its subprocesses (uvicorn's workers) while the block
    runs."""
    if path is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    command = [exe, "record", "--pid", str(pid), "--subprocesses", "--output", str(path)]
    spy = subprocess.Popen(
        [*command, "--format", fmt, "--rate", "100"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.5)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=120)
        except subprocess.TimeoutExpired:
            spy.kill()


def connections_opened(server_url: str) -> int | None:
    """The database server's count of connections opened so far (every client's); None on
    SQLite (no server)."""
    if server_url.startswith("sqlite"):
        return None
    with contextlib.suppress(Exception), connect(server_url) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        row = cur.fetchone()
        return int(row[1]) if row else None
    return None


def drive(
    server: Served,
    key: str,
    kind: Kind,
    *,
    merchants: int,
    settings: Settings,
    connections: int,
    seconds: float,
    warmup: float,
    seed: int,
    mysqld: int | None,
    db_url: str,
    progress: Progress,
    profile: Path | None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Warm up, then drive ``kind`` against ``server``, closed loop or (``rate``) open loop at
    that many requests/s; the figures of the run."""

    def pickers(salt: int) -> list[Picker]:
        return [
            kind.picker(Merchants(kind.merchants, merchants, random.Random(salt + i), settings))
            for i in range(connections)
        ]

    label = kind.name if rate is None else f"{kind.name} at {rate:,.0f}/s"
    task = progress.add_task(f"{label}: warming up", total=None)

    def on_progress(tally: Tally, elapsed: float) -> None:
        answered = sum(len(v) for v in tally.latencies.values())
        progress.update(
            task,
            description=f"{label}: {elapsed:4.1f}/{seconds:g} s, "
            f"{answered / elapsed if elapsed else 0:,.0f}/s",
        )

    try:
        if warmup > 0:
            asyncio.run(send(server.url, key, pickers(seed * 1_000_003), warmup, rate))
        opened = connections_opened(db_url)
        api_cpu, db_cpu = server.cpu(), process_cpu(mysqld)
        with sampling(profile, server.process.pid):
            tally = asyncio.run(send(server.url, key, pickers(seed), seconds, rate, on_progress))
        api_cpu = server.cpu() - api_cpu
        db_after = process_cpu(mysqld)
        opened_after = connections_opened(db_url)
    finally:
        progress.remove_task(task)
    answered = sum(len(v) for v in tally.latencies.values())
    ok = sum(v for k, v in tally.statuses.items() if 200 <= k < 300)
    every = [x for v in tally.latencies.values() for x in v]
    return {
        "key": kind.key,
        "name": kind.name,
        "group": kind.group,
        "baseline": kind.baseline,
        "mode": "closed" if rate is None else "open",
        "rate": rate,
        "seconds": seconds,
        "answered": answered,
        "elapsed_seconds": round(tally.elapsed, 3),
        "per_second": round(answered / tally.elapsed, 1) if tally.elapsed else 0.0,
        "ok_per_second": round(ok / tally.elapsed, 1) if tally.elapsed else 0.0,
        "by_status": {str(k): v for k, v in sorted(tally.statuses.items())},
        "connection_errors": tally.connection_errors,
        "mean_body_bytes": round(tally.body_bytes / answered) if answered else 0,
        "latency_ms": latency(every),
        "latency_ms_by_tag": {tag: latency(v) for tag, v in sorted(tally.latencies.items())},
        "client_cpu_seconds": round(tally.client_cpu_seconds, 2),
        "api_cpu_seconds": round(api_cpu, 2),
        "db_cpu_seconds": None
        if db_cpu is None or db_after is None
        else round(db_after - db_cpu, 2),
        # Minus the one that reads the count; other clients of the server count too.
        "db_connections_opened": None
        if opened is None or opened_after is None
        else opened_after - opened - 1,
    }


# -- the command -------------------------------------------------------------------------------


def main(
    payments: Annotated[int, typer.Option(min=100, help="Payments in the read database.")] = (
        1_000_000
    ),
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 32,
    seconds: Annotated[float, typer.Option(min=0.5, help="Measured seconds per kind.")] = 5.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first, per kind.")] = 1.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    pages: Annotated[
        int, typer.Option(min=2, help="Pages per walk of the list (first page included).")
    ] = 10,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; the bench creates its databases), or 'sqlite' (or "
            "sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    days: Annotated[int, typer.Option(min=1, max=60, help="Days the payments span.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set and of the requests.")] = 7,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Measure only these kinds (keys; repeat). Baselines always run."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for one kind (.svg, .json, or collapsed stacks)."),
    ] = None,
    profile_kind: Annotated[
        str, typer.Option(help="The kind --profile samples (its key).")
    ] = "list-next-big",
    keep: Annotated[
        bool, typer.Option(help="Keep the read database (its name is printed).")
    ] = False,
    reuse: Annotated[
        str | None,
        typer.Option(help="Measure the read database NAME_r kept by an earlier --keep."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=1, help="Open loop at this many requests/s for every kind (default: --rate-share)."
        ),
    ] = None,
    rate_share: Annotated[
        float,
        typer.Option(
            min=0.01, max=1.0, help="Without --rate: open loop at this share of the kind's req/s."
        ),
    ] = RATE_SHARE,
) -> None:
    """Benchmark the query API's summaries and list pages against a bare GET endpoint."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    name = reuse or f"kessai_bench_{uuid.uuid4().hex[:10]}"
    read_db, keys_db = f"{name}_r", f"{name}_k{uuid.uuid4().hex[:6]}"
    stores = Stores(db_url, Path())
    if stores.sqlite and (keep or reuse is not None):
        raise typer.BadParameter("--keep and --reuse need a server: SQLite files are temporary")
    home = temporary_home(db_url, "kessai-bench-queries-")
    stores = Stores(db_url, home)
    read_url, keys_url = stores.url(read_db), stores.url(keys_db)
    shape = Shape(payments=payments, seed=seed, days=days)
    settings = Settings()
    every_kind = kinds(pages)
    known = {k.key for k in every_kind}
    for key in [*(only or []), *([profile_kind] if profile else [])]:
        if key not in known:
            raise typer.BadParameter(f"unknown kind {key!r}: one of {', '.join(sorted(known))}")
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "connections": connections,
            "seconds": seconds,
            "warmup_seconds": warmup,
            "workers": workers,
            "pages_per_walk": pages,
            "open_loop_rate": rate,
            "open_loop_rate_share": None if rate is not None else rate_share,
            "seed": seed,
            "summary_cache_seconds": settings.summary_cache_seconds,
            "redis": settings.redis_url is not None and "KESSAI_REDIS_URL" in os.environ,
        },
        "targets": TARGETS,
        "databases": [read_db, keys_db],
        "directory": str(home),
    }
    mysqld = stores.server_pid()
    created: list[str] = []
    try:
        with Progress(
            TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            started = time.perf_counter()
            if reuse is None:
                stores.create(read_db)
                created.append(read_db)
                upgrade("read", read_url)
                if stores.sqlite:  # the same rows, computed here: see bench/queries_sqlite.py
                    from bench import queries_sqlite

                    report["load"] = queries_sqlite.load(shape, stores, read_db, settings, progress)
                else:
                    report["load"] = load(shape, db_url, read_db, settings, progress)
                report["load"]["seconds"] = round(time.perf_counter() - started, 2)
                console.print(
                    f"loaded {payments:,} payments in {report['load']['seconds']:.1f} s "
                    f"(rows {report['load']['rows_seconds']:.1f} s, indexes "
                    f"{report['load']['indexes_seconds']:.1f} s, totals "
                    f"{report['load']['totals_seconds']:.1f} s)"
                )
            report["data"] = counts(read_url)
            data = report["data"]
            merchants = data["merchants"]
            report["data"].update({"days": days, "seed": seed, "database": read_db})
            if data["last_payment_at"] is not None:
                behind = datetime.now(UTC) - datetime.fromisoformat(data["last_payment_at"])
                if behind > timedelta(hours=6):
                    console.print(
                        f"[yellow]the data ends {behind} ago: today's summaries and the "
                        "newest pages hold less than when it was loaded[/yellow]"
                    )
            stores.create(keys_db)
            created.append(keys_db)
            upgrade("keys", keys_url)
            engine = create_db_engine(keys_url, pool_size=1)
            try:
                key = create_key(
                    engine,
                    [merchant_scope(m) for m in merchant_ids(merchants)],
                    "bench.queries",
                )[1]
            finally:
                engine.dispose()
            env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
            for setting in ("REDIS_URL", "SUMMARY_CACHE_SECONDS"):
                if f"KESSAI_{setting}" in os.environ:
                    env[f"KESSAI_{setting}"] = os.environ[f"KESSAI_{setting}"]
            env.update(
                {
                    "KESSAI_HOME": str(home),
                    "KESSAI_READ_DB_URL": read_url,
                    "KESSAI_KEYS_DB_URL": keys_url,
                    "KESSAI_WRITE_DB_URL": f"sqlite:///{home / 'write.db'}",
                    "KESSAI_RATE_LIMIT_PER_IP": UNLIMITED,
                    "KESSAI_RATE_LIMIT_READS": UNLIMITED,
                    "KESSAI_RATE_LIMIT_EXPENSIVE": UNLIMITED,
                    "KESSAI_LOG_LEVEL": "WARNING",
                }
            )
            report["settings"]["redis"] = "KESSAI_REDIS_URL" in env
            report["explain"] = explain(read_url, settings, merchants)
            query_port, bare_port = free_port(), free_port()
            api_argv = [sys.executable, "-m", "kessai.cli", "query-api", "--host", "127.0.0.1"]
            api_argv += ["--port", str(query_port), "--workers", str(workers)]
            bare_argv = [sys.executable, "-m", "uvicorn", "bench.bare_app:create_app"]
            bare_argv += ["--factory", "--host", "127.0.0.1", "--port", str(bare_port)]
            bare_argv += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
            with (
                served(api_argv, env, query_port, home / "query-api.log") as api,
                served(bare_argv, env, bare_port, home / "bare.log") as bare,
            ):
                task = progress.add_task("checking the answers against the rows", total=None)
                report["check"] = check(Client(api.url, key), read_url, settings, merchants)
                progress.remove_task(task)
                runs: list[dict[str, Any]] = []
                open_runs: list[dict[str, Any]] = []
                bare_at: dict[tuple[str, float], dict[str, Any]] = {}

                def measure(kind: Kind, at: float | None = None) -> dict[str, Any]:
                    server = bare if kind.group == "bare" else api
                    return drive(
                        server,
                        key,
                        kind,
                        merchants=merchants,
                        settings=settings,
                        connections=connections,
                        seconds=seconds if at is None else open_seconds(seconds, at),
                        warmup=warmup,
                        seed=seed,
                        mysqld=mysqld,
                        db_url=db_url,
                        progress=progress,
                        profile=profile if kind.key == profile_kind and at is None else None,
                        rate=at,
                    )

                baselines = {k.key: k for k in every_kind if k.group == "bare"}
                for kind in baselines.values():
                    runs.append(measure(kind))
                for kind in every_kind:
                    if kind.group != "bare" and (not only or kind.key in only):
                        saturated = measure(kind)
                        runs.append(saturated)
                        at = rate or stated_rate(saturated["per_second"], rate_share)
                        mine = measure(kind, at)
                        if (kind.baseline, at) not in bare_at:
                            bare_at[kind.baseline, at] = measure(baselines[kind.baseline], at)
                        open_runs.append(open_loop(mine, bare_at[kind.baseline, at]))
                for kind in baselines.values():
                    runs.append(measure(kind))
                report["memory"] = {"query_api": api.memory(), "bare": bare.memory()}
        report["runs"] = ratios(runs)
        report["open_loop"] = open_runs
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        for db in created:
            if keep and db == read_db:
                continue
            with contextlib.suppress(Exception):
                stores.drop(db)
        if reuse is not None and not keep:
            with contextlib.suppress(Exception):
                drop_database(db_url, read_db)
        if keep:
            console.print(f"kept: --reuse {name}  ({read_db})")
        shutil.rmtree(home, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stated_rate(saturated_per_second: float, share: float) -> float:
    """The open loop's rate for a kind: ``share`` of the rate it reached closed-loop, rounded
    to two significant digits (a rate worth stating), at least 1 request/s."""
    raw = max(1.0, saturated_per_second * share)
    digits = len(str(int(raw))) - 2
    return float(max(1, round(raw, -digits if digits > 0 else 0)))


def open_seconds(seconds: float, rate: float) -> float:
    """How long an open loop runs: ``seconds``, longer (up to three times) when that would
    give fewer than ``OPEN_LOOP_REQUESTS`` requests, so that the p99 rests on ten or more."""
    return round(min(3 * seconds, max(seconds, OPEN_LOOP_REQUESTS / rate)), 2)


def open_loop(mine: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """A kind's open-loop run beside the bare endpoint's at the same rate."""
    rate = mine["rate"]
    bare_p99 = bare["latency_ms"]["p99"]
    return {
        "key": mine["key"],
        "name": mine["name"],
        "group": mine["group"],
        "rate": rate,
        # Every request due was sent; a server that fell behind shows as a lower rate
        # answered (the run lasted longer than its schedule).
        "sustained": mine["per_second"] >= 0.95 * rate and bare["per_second"] >= 0.95 * rate,
        "p99_vs_bare": round(mine["latency_ms"]["p99"] / bare_p99, 2) if bare_p99 else None,
        "api": mine,
        "bare": bare,
    }


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run with its rate and p99 against the mean of its baseline's runs."""
    base: dict[str, tuple[float, float]] = {}
    for key in {r["baseline"] for r in runs}:
        mine = [r for r in runs if r["key"] == key]
        if mine:
            base[key] = (
                sum(r["per_second"] for r in mine) / len(mine),
                sum(r["latency_ms"]["p99"] for r in mine) / len(mine),
            )
    for r in runs:
        rate, p99 = base.get(r["baseline"], (0.0, 0.0))
        r["rate_vs_bare"] = round(r["per_second"] / rate, 3) if rate else None
        r["p99_vs_bare"] = round(r["latency_ms"]["p99"] / p99, 2) if p99 else None
    return runs


def show(report: dict[str, Any]) -> None:
    m, s, d = report["machine"], report["settings"], report["data"]
    about = machine_table(m)
    about.add_row(
        "data",
        f"{d['payments']:,} payments ({d['big_merchant_payments']:,} of m00000), "
        f"{d['refunds']:,} refunds, {d['merchants']:,} merchants, {d['days']} days; totals rows: "
        f"{d['daily_totals_rows']:,} by day, {d['hourly_totals_rows']:,} by hour",
    )
    about.add_row("tables MiB", ", ".join(f"{k} {v:,}" for k, v in sorted(d["table_mib"].items())))
    if "load" in report:
        load = report["load"]
        about.add_row(
            "load time",
            f"{load['seconds']} s: rows {load['rows_seconds']} s, indexes "
            f"{load['indexes_seconds']} s, totals {load['totals_seconds']} s",
        )
    about.add_row(
        "run",
        f"{s['connections']} connections, {s['seconds']:g} s per kind (+{s['warmup_seconds']:g} s "
        f"warm-up), {s['workers']} uvicorn workers, summary cache {s['summary_cache_seconds']:g} s "
        f"({'Redis' if s['redis'] else 'per process'})",
    )
    check = report["check"]
    about.add_row(
        "check",
        f"passed: {len(check['summaries'])} summaries, {check['pages']} pages, "
        f"{check['walked_payments']:,} payments walked",
    )
    console.print(about)
    table = Table(
        title="by kind: req/s and latency ms (x bare: rate / bare rate, p99 / bare p99); "
        "CPU s of the API and the DB; DB connections opened"
    )
    for column in (
        "kind", "req/s", "x bare", "p50", "p90", "p99", "x bare", "max", "errors",
        "API", "DB", "conns",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column == "kind" else "right", no_wrap=column == "kind"
        )
    for r in report["runs"]:
        bad = sum(v for k, v in r["by_status"].items() if not 200 <= int(k) < 300)
        rows = [(r["name"], r["latency_ms"])]
        if len(r["latency_ms_by_tag"]) > 1:
            rows += [(f"  {tag}", lat) for tag, lat in r["latency_ms_by_tag"].items()]
        for i, (label, lat) in enumerate(rows):
            first = i == 0

            def only(text: str, first: bool = first) -> str:
                return text if first else ""

            table.add_row(
                label,
                f"{r['per_second']:,.0f}" if first else f"{lat['count']:,}",
                only("-" if r["rate_vs_bare"] is None else f"{r['rate_vs_bare']:.2f}"),
                *(f"{lat[q]:.1f}" for q in ("p50", "p90", "p99")),
                only("-" if r["p99_vs_bare"] is None else f"{r['p99_vs_bare']:.1f}"),
                f"{lat['max']:.0f}",
                only(f"{bad + r['connection_errors']:,}"),
                only(f"{r['api_cpu_seconds']:.1f}"),
                only("-" if r["db_cpu_seconds"] is None else f"{r['db_cpu_seconds']:.1f}"),
                only(
                    "-" if r["db_connections_opened"] is None else str(r["db_connections_opened"])
                ),
            )
    console.print(table)
    mem = report["memory"]
    memory = Table(title="peak RSS (VmHWM) of the served processes, MiB")
    memory.add_column("server")
    memory.add_column("per process (supervisor, workers)")
    memory.add_column("largest", justify="right")
    for label, key in (("query API", "query_api"), ("bare", "bare")):
        memory.add_row(
            label,
            ", ".join(f"{x:.0f}" for x in mem[key]["peak_rss_mib_per_process"]),
            f"{mem[key]['peak_rss_mib_max']:.0f}",
        )
    console.print(memory)
    sqlite = str(m["database"]).startswith("SQLite")
    plans = Table(
        title=f"{'EXPLAIN QUERY PLAN' if sqlite else 'ANALYZE'} of the statements the API issues"
    )
    for column in ("query", "type", "key", "rows (est.)", "r_rows", "r_filtered", "Extra", "ms"):
        plans.add_column(column)
    for e in report["explain"]:
        for step in e["plan"]:
            plans.add_row(
                e["query"],
                str(step.get("type")),
                str(step.get("key")),
                str(step.get("rows")),
                str(step.get("r_rows")),
                str(step.get("r_filtered")),
                str(step.get("detail" if sqlite else "Extra")),
                f"{e['statement_ms']:.2f}",
            )
    console.print(plans)
    if report["open_loop"]:
        console.print(open_loop_table(report))
    saturated = {r["key"]: r for r in report["runs"]}
    targets = Table(
        title=f"targets (at {TARGETS['at_payments']:,} payments): p99 at the stated rate "
        f"(open loop); p99 at {s['connections']} connections (saturated) for reference"
    )
    for column in ("kind", "rate/s", "p99 ms", "target", "met", "saturated p99 ms"):
        targets.add_column(column, justify="left" if column == "kind" else "right")
    for o in report["open_loop"]:
        limit = target_ms(o["group"])
        p99 = o["api"]["latency_ms"]["p99"]
        ok = p99 < limit and o["sustained"]
        targets.add_row(
            o["name"],
            f"{o['rate']:,.0f}",
            f"{p99:.1f}",
            f"< {limit:g} ms",
            "[green]yes[/green]" if ok else "[red]no[/red]",
            f"{saturated[o['key']]['latency_ms']['p99']:.1f}",
        )
    if d["payments"] != TARGETS["at_payments"]:
        targets.caption = f"measured at {d['payments']:,} payments, not at the target's size"
    console.print(targets)


def target_ms(group: str) -> float:
    return TARGETS["summary_p99_ms"] if group == "summary" else TARGETS["list_p99_ms"]


def open_loop_table(report: dict[str, Any]) -> Table:
    s = report["settings"]
    how = (
        f"{s['open_loop_rate']:,.0f} requests/s"
        if s["open_loop_rate"] is not None
        else f"{s['open_loop_rate_share']:.0%} of the kind's closed-loop req/s"
    )
    table = Table(
        title=f"open loop at a stated rate ({how}; latency from when each request was due), "
        "the bare endpoint at the same rate"
    )
    for column in (
        "kind", "rate/s", "ans/s", "p50", "p90", "p99", "max",
        "bare p50", "bare p99", "p99 x bare", "errors",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column == "kind" else "right", no_wrap=column == "kind"
        )
    for o in report["open_loop"]:
        mine, bare = o["api"], o["bare"]
        lat, base = mine["latency_ms"], bare["latency_ms"]
        bad = sum(v for k, v in mine["by_status"].items() if not 200 <= int(k) < 300)
        answered = f"{mine['per_second']:,.0f}"
        table.add_row(
            o["name"],
            f"{o['rate']:,.0f}",
            answered if o["sustained"] else f"[red]{answered}[/red]",
            *(f"{lat[q]:.1f}" for q in ("p50", "p90", "p99")),
            f"{lat['max']:.0f}",
            f"{base['p50']:.1f}",
            f"{base['p99']:.1f}",
            "-" if o["p99_vs_bare"] is None else f"{o['p99_vs_bare']:.1f}",
            f"{bad + mine['connection_errors']:,}",
        )
    table.caption = "ans/s (answered) in red: the server (or the bare one) fell behind the schedule"
    return table


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
