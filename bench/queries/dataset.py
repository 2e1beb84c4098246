"""The data set of the queries bench: its shape, and the read side loaded on a MySQL/MariaDB
server by ``INSERT ... SELECT`` (``sqlite`` computes the same rows for SQLite)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from rich.progress import Progress

from bench.reconciler import (
    connect,
)
from kessai.settings import Settings
from kessai_cli import loadgen

SLOTS = 65_536
"""Merchants are drawn by CRC32 modulo this many slots, each slot owned by one merchant in
proportion to its weight (the smallest tail merchant of 2,000 still owns about 3 slots)."""
OTHER_ZONE = "Asia/Kolkata"
"""No daylight saving time: local buckets are a fixed offset from UTC, computed on the server."""
CHUNK = 1_000_000
"""Payments per INSERT ... SELECT statement while loading."""


PAGE_SIZE = 50
"""The list's default page size."""


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
    timings: dict[str, float] = {}
    task = progress.add_task("loading", total=None)
    with connect(server_url, read_db) as conn, conn.cursor() as cur:
        conn.autocommit(True)
        cur.execute("SET SESSION tmp_table_size = 1073741824, max_heap_table_size = 1073741824")
        cur.execute("SET SESSION unique_checks = 0, foreign_key_checks = 0")
        _create_slot_tables(cur, shape, span, settings)
        schema_before, indexes = _drop_secondary_indexes(cur)
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
        _add_secondary_indexes(cur, indexes, schema_before)
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


def _create_slot_tables(cur: Any, shape: Shape, span: Span, settings: Settings) -> None:
    """The merchants' slots and ranks, in memory: every generated row looks its slot up (three
    times as fast as InnoDB); and the ``merchants`` rows of those in another zone."""
    zones = zone_names(shape.merchants)
    offsets = {
        name: offset_minutes(name, span.start, span.end)
        for name in {settings.default_merchant_time_zone, *zones.values()}
    }
    merchant = "merchant_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL"
    cur.execute(
        f"CREATE TABLE bench_slots (slot INT PRIMARY KEY, {merchant}, merchant_rank INT"
        " NOT NULL, offset_minutes INT NOT NULL) ENGINE=MEMORY"
    )
    cur.execute(
        f"CREATE TABLE bench_merchants (merchant_rank INT PRIMARY KEY, {merchant}) ENGINE=MEMORY"
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


def _drop_secondary_indexes(cur: Any) -> tuple[str, dict[str, list[str]]]:
    """Drop the payments' secondary indexes for the load; returns the table's definition and
    the indexes as the migration made them, in the table's order."""
    cur.execute("SHOW CREATE TABLE payments")
    schema_before: str = cur.fetchone()[1]
    cur.execute("SHOW INDEX FROM payments")
    indexes: dict[str, list[str]] = {}
    for row in cur.fetchall():
        if row[2] != "PRIMARY":
            indexes.setdefault(row[2], []).append(row[4])  # Key_name, Column_name
    cur.execute("ALTER TABLE payments " + ", ".join(f"DROP INDEX `{ix}`" for ix in indexes))
    return schema_before, indexes


def _add_secondary_indexes(cur: Any, indexes: dict[str, list[str]], schema_before: str) -> None:
    """Build the dropped indexes again; the table must then be exactly its migrated form."""
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


def counts(read_url: str) -> dict[str, Any]:
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


def in_other_zone(rank: int) -> bool:
    """As ``zone_names``: every tenth merchant but the big one."""
    return rank > 0 and rank % 10 == 0


def zone_of(merchant: str, settings: Settings) -> ZoneInfo:
    other = in_other_zone(int(merchant[1:]))
    return ZoneInfo(OTHER_ZONE if other else settings.default_merchant_time_zone)
