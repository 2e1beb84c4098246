"""How fast the projector applies a preloaded topic, against raw batched upserts of its rows.

``python -m bench.projector [--events 1000000] [--db-url mysql+pymysql://root@127.0.0.1:3306]
[--json out.json]``

1. Starts a private embedded broker (Tansu, ``kessai.broker.EmbeddedBroker`` on a free port)
   and creates the topic with ``kessai.broker.ensure_topic``, as every kessai component does.
2. Builds ``--events`` events with the real event classes (the plan of ``bench.reconciler``:
   payments captured over ``--days`` days, 5% refunded once, a fifth of those twice; one
   merchant with 30% of the payments, a Zipf tail; 5% in USD; one merchant in ten in another
   time zone) and publishes them exactly as the relay does: key = payment id, partition from
   aiokafka's default partitioner, the relay's headers, in the order the events happened, with
   ``send_batch`` per partition (no waiting for each record). The topic's real end offsets
   (fetch high watermarks) must add up to ``--events``.
3. Measures, in this order:
   - **baseline (before)**: into a fresh, migrated read database, the rows the projector would
     write for those events, through PyMySQL's ``executemany`` of multi-row ``INSERT ... ON
     DUPLICATE KEY UPDATE``: per batch of ``--batch-size`` records (the projector's batch
     size; records taken partition after partition, in offset order, as a consumer receives
     them), the upserted ``payments`` rows (state after the batch), the ``refunds`` rows, and
     the day and hour totals' increments, each statement sorted by primary key, one
     transaction per batch, one connection. The rows are computed before the clock starts: this
     is what the server and the driver do at best with what the projector writes;
   - **projector**: the real projector (``kessai projector``, a subprocess) against another
     fresh read database, from its start until its stored offsets reach the end of the log
     (polled in the read database, where each batch's offsets are committed with its effects).
     Reported twice: from the process's start (imports and joining the consumer group
     included), and from its first applied batch to its last (the rate the target is about);
   - the check (below), then both databases are dropped;
   - **baseline (after)**, into a third fresh database, the only one of the run left on the
     server, as for the first. Ratios divide by the mean of the two baseline rates.
4. The check: the projector's read database must hold the payments per currency with their
   captured and refunded sums, the refunds, and the sums of both totals tables that the
   preloaded events imply, no parked event and no dead letter; and every payment, refund and
   totals row must equal the first baseline's. Any difference fails the benchmark. Each
   baseline's database is checked against the events the same way.
5. Prints the figures and the machine, writes them as JSON with ``--json``; stops the broker
   and the projector and drops every database it created, also on failure and Ctrl-C.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs the same on the embedded default: the three
read databases are SQLite files in a temporary directory (under DIR), deleted where the server's
are dropped and with the directory at the end; the baseline is the stdlib ``sqlite3`` driver's
``executemany`` of ``INSERT ... ON CONFLICT (primary key) DO UPDATE`` (the statement
``kessai.db.upsert`` issues on SQLite), the same rows per batch, one transaction per batch, with
times converted to SQLite's text form before the clock starts; the row check attaches the
baseline's file. SQLite runs inside the processes, so there is no server CPU to report.

CPU seconds are read from ``/proc`` (the projector process, this process for the baseline,
and the MariaDB server, which includes whatever else used it meanwhile); peak RSS is the
projector's ``VmHWM``. ``--profile FILE`` attaches py-spy (``pip install py-spy``) to the
projector process for its whole run (``.svg`` flame graph, ``.json`` speedscope, anything else
collapsed stacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NamedTuple
from zoneinfo import ZoneInfo

import orjson
import typer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.reconciler import (
    DEFAULT_DB_URL,
    PAYMENT_COLUMNS,
    REFUND_COLUMNS,
    TOTAL_COLUMNS,
    Planned,
    Shape,
    _at,
    _naive,
    assign_ids,
    insert_sql,
    machine_table,
    merchant_zones,
    plan,
    process_cpu,
    sqlite_rows,
)
from bench.stores import Stores, temporary_home
from bench.writes import memory_kib
from kessai.broker import EmbeddedBroker, ensure_topic, free_port, log_ends, new_producer
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    kafka_headers,
    kafka_key,
)
from kessai.ledger import PaymentState, apply
from kessai.migrate import upgrade
from kessai.settings import Settings

TARGET = 0.80
"""The projector applies at least 80% of the raw batched-upsert rate."""
POLL_SECONDS = 0.02
"""How often the projector's stored offsets are read while it runs."""

console = Console(width=None if sys.stdout.isatty() else 120)


# -- the data set ------------------------------------------------------------------------------

Header = tuple[str, bytes]


class Effect(NamedTuple):
    """What one event does to the read side, as the projector computes it."""

    payment: tuple[Any, ...]
    """The ``payments`` row after this event (``PAYMENT_COLUMNS``)."""
    refund: tuple[Any, ...] | None
    """The ``refunds`` row this event adds (``REFUND_COLUMNS``), if it is a refund."""
    merchant: str
    currency: str
    day: date
    hour: datetime
    refunded: bool
    amount: int


@dataclass(slots=True)
class Expected:
    """What the read side must hold once every event is applied."""

    by_currency: dict[str, list[int]] = field(default_factory=dict)
    """currency -> [payments, captured sum, refunded sum]"""
    refunds: int = 0
    refunds_amount: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "payments_by_currency": {
                c: {"payments": n, "captured": cap, "refunded": ref}
                for c, (n, cap, ref) in sorted(self.by_currency.items())
            },
            "refunds": self.refunds,
            "refunds_amount": self.refunds_amount,
        }


@dataclass(slots=True)
class Prepared:
    """The events as records per partition, in offset order, and their effects alongside."""

    records: list[list[tuple[bytes, bytes, list[Header]]]]
    effects: list[list[Effect]]
    expected: Expected
    payments: int
    merchants: int


def topic_order(planned: Sequence[Planned]) -> list[tuple[float, int, int]]:
    """(time, payment index, version) of every event, in the order they happened: the order
    the relay publishes them (the outbox is in commit order)."""
    timeline = [(p.at, i, 1) for i, p in enumerate(planned)]
    timeline += [
        (when, i, v) for i, p in enumerate(planned) for v, (when, _, _) in enumerate(p.refunds, 2)
    ]
    timeline.sort()
    return timeline


def prepare(shape: Shape, partitions: int, default_zone: str, progress: Progress) -> Prepared:
    """Build every event with the event classes, its record as the relay publishes it, and its
    effect on the read side (state from ``kessai.ledger.apply``, buckets in the merchant's
    zone), as the projector computes them."""
    task = progress.add_task("planning", total=None)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    planned = plan(shape, end)
    assign_ids(planned)
    timeline = topic_order(planned)
    zones = {m: ZoneInfo(z) for m, z in merchant_zones(shape).items()}
    fallback = ZoneInfo(default_zone)
    every = list(range(partitions))
    partitioner = DefaultPartitioner()
    records: list[list[tuple[bytes, bytes, list[Header]]]] = [[] for _ in every]
    effects: list[list[Effect]] = [[] for _ in every]
    states: dict[int, PaymentState] = {}
    expected = Expected()
    progress.update(task, description="building events", total=len(timeline), completed=0)
    for n, (when, i, version) in enumerate(timeline):
        p = planned[i]
        payment_id = p.ids[0]
        event: PaymentCaptured | PaymentRefunded
        if version == 1:
            event = PaymentCaptured(
                event_id=p.ids[1],
                payment_id=payment_id,
                version=1,
                merchant_id=p.merchant,
                occurred_at=_at(when),
                recorded_at=_at(when),
                payload=PaymentCapturedPayload(
                    amount=p.amount,
                    currency=p.currency,
                    user_id=p.user,
                    method="card" if p.method == "card" else "balance",
                    store_id=p.store_id,
                    order_ref=p.order_ref,
                    metadata=p.metadata,
                ),
            )
            state = apply(None, event)
            sums = expected.by_currency.setdefault(p.currency, [0, 0, 0])
            sums[0] += 1
            sums[1] += p.amount
        else:
            refunds = len(p.refunds)
            _, amount, reason = p.refunds[version - 2]
            event = PaymentRefunded(
                event_id=p.ids[version],
                payment_id=payment_id,
                version=version,
                merchant_id=p.merchant,
                occurred_at=_at(when),
                recorded_at=_at(when),
                payload=PaymentRefundedPayload(
                    refund_id=p.ids[2 + refunds + version - 2],
                    amount=amount,
                    currency=p.currency,
                    refunded_amount=sum(a for _, a, _ in p.refunds[: version - 1]),
                    reason=reason,
                ),
            )
            state = apply(states[i], event)
            expected.by_currency[p.currency][2] += amount
            expected.refunds += 1
            expected.refunds_amount += amount
        if version <= len(p.refunds):
            states[i] = state
        else:
            states.pop(i, None)
        key = kafka_key(payment_id)
        partition = partitioner(key, every, every)
        records[partition].append(
            (
                key,
                event_to_json(event),
                kafka_headers(event.event_type, event.schema_version, event.event_id),
            )
        )
        local = event.occurred_at.astimezone(zones.get(p.merchant, fallback))
        refund: tuple[Any, ...] | None = None
        if isinstance(event, PaymentRefunded):
            r = event.payload
            refund = (
                payment_id.bytes, version, r.refund_id.bytes, p.merchant, r.amount, p.currency,
                r.reason, _naive(event.occurred_at),
            )  # fmt: skip
        row = (
            payment_id.bytes, state.merchant_id, state.user_id, p.store_id, p.order_ref,
            state.method, state.currency, state.captured_amount, state.refunded_amount,
            state.status, state.version,
            orjson.dumps(p.metadata, option=orjson.OPT_SORT_KEYS).decode(),
            _naive(state.created_at), _naive(state.updated_at),
        )  # fmt: skip
        effects[partition].append(
            Effect(
                payment=row,
                refund=refund,
                merchant=p.merchant,
                currency=p.currency,
                day=local.date(),
                hour=local.replace(minute=0, second=0, microsecond=0, tzinfo=None),
                refunded=refund is not None,
                amount=event.payload.amount,
            )
        )
        if n % 10_000 == 0:
            progress.update(task, completed=n)
    progress.remove_task(task)
    return Prepared(
        records=records,
        effects=effects,
        expected=expected,
        payments=len(planned),
        merchants=len({p.merchant for p in planned}),
    )


# -- the broker --------------------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str, partitions: int) -> int:
    actual = await ensure_topic(bootstrap, topic, partitions=partitions)
    if actual != partitions:
        raise RuntimeError(f"topic {topic} has {actual} partitions, not {partitions}")
    return actual


async def publish(
    bootstrap: str,
    topic: str,
    records: list[list[tuple[bytes, bytes, list[Header]]]],
    progress: Progress,
) -> None:
    """Every partition's records in order, as record batches sent without waiting for each
    other's acknowledgement (aiokafka keeps one batch per partition queued behind the one in
    flight, so a partition's batches stay in order); then wait for every acknowledgement."""
    producer = new_producer(bootstrap)
    await producer.start()
    task = progress.add_task("publishing", total=sum(map(len, records)))
    try:
        known = sorted(await producer.partitions_for(topic))
        if known != list(range(len(records))):
            raise RuntimeError(f"topic {topic} has partitions {known}")

        async def one(partition: int, mine: list[tuple[bytes, bytes, list[Header]]]) -> None:
            acks: list[asyncio.Future[object]] = []
            batch = producer.create_batch()
            count = 0
            for key, value, headers in mine:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                    progress.advance(task, count)
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        raise RuntimeError("a record larger than a batch")
                count += 1
            if count:
                acks.append(await producer.send_batch(batch, topic, partition=partition))
                progress.advance(task, count)
            await asyncio.gather(*acks)

        await asyncio.gather(*(one(p, mine) for p, mine in enumerate(records)))
    finally:
        progress.remove_task(task)
        await producer.stop()


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


# -- the projector -----------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One projector run: from its start, and from its first applied batch, to the end."""

    seconds: float = 0.0
    startup_seconds: float = 0.0
    """From the start of the process until its first batch was seen applied."""
    apply_seconds: float = 0.0
    applied_in_window: int = 0
    """Events applied between the first batch seen and the end."""
    cpu_seconds: float = 0.0
    apply_cpu_seconds: float = 0.0
    server_cpu_seconds: float | None = None
    apply_server_cpu_seconds: float | None = None
    peak_rss_mib: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def stored_position(cur: Any, topic: str, param: str = "%s") -> int:
    cur.execute(
        f"SELECT COALESCE(SUM(next_offset), 0) FROM projector_offsets WHERE topic = {param}",
        (topic,),
    )
    return int((cur.fetchone() or (0,))[0])


def scrape(port: int) -> dict[str, float]:
    """The projector's own counters (``KESSAI_PROJECTOR_METRICS_PORT``), labels summed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kessai_projector_") and "_bucket" not in sample.name:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def settled(port: int, total: int, timeout: float = 10.0) -> dict[str, float]:
    """The projector's counters once they count every event: it counts a batch after its
    transaction (offsets included) commits, so the stored offsets reach the end of the log
    just before the counters do."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(port)
        counted = sum(
            found.get(f"kessai_projector_{name}_total", 0.0)
            for name in ("events_applied", "duplicates", "parked", "dead_letters")
        )
        if counted >= total or time.monotonic() > deadline:
            return found
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def sampling(pid: int, path: Path | None) -> Iterator[None]:
    """py-spy attached to process ``pid`` while the block runs (all threads, idle included)."""
    if path is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    command = [exe, "record", "--pid", str(pid), "--output", str(path), "--format", fmt]
    spy = subprocess.Popen(
        [*command, "--rate", "100", "--idle", "--threads"],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=120)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def run_projector(
    *,
    env: dict[str, str],
    stores: Stores,
    database: str,
    topic: str,
    total: int,
    metrics_port: int,
    mysqld: int | None,
    timeout: float,
    profile: Path | None,
    log: Path,
    progress: Progress,
) -> Run:
    """Start ``kessai projector``, wait until its stored offsets reach ``total``, stop it."""
    run = Run()
    task = progress.add_task("projector: starting", total=total)
    with stores.cursor(database) as (conn, cur):
        if stores.sqlite:
            conn.isolation_level = None  # autocommit: every poll sees the latest commit
        else:
            conn.autocommit(True)
        server_start = process_cpu(mysqld)
        with log.open("ab") as out:
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "kessai.cli", "projector"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            with sampling(process.pid, profile):
                first: tuple[float, int, float, float | None] | None = None
                while True:
                    position = stored_position(cur, topic, stores.param)
                    now = time.perf_counter()
                    if position and first is None:
                        first = (
                            now,
                            position,
                            process_cpu(process.pid) or 0.0,
                            process_cpu(mysqld),
                        )
                        progress.update(task, description="projector: applying")
                    progress.update(task, completed=position)
                    if position >= total:
                        break
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"the projector exited with {process.returncode}: "
                            f"{log.read_text(errors='replace')[-3000:]}"
                        )
                    if now - started > timeout:
                        raise RuntimeError(
                            f"the projector applied {position:,} of {total:,} events in "
                            f"{timeout:g} s"
                        )
                    time.sleep(POLL_SECONDS)
                ended = now
                cpu = process_cpu(process.pid) or 0.0
                server_end = process_cpu(mysqld)
                peak = memory_kib(process.pid, "VmHWM")
                run.metrics = settled(metrics_port, total)
        finally:
            progress.remove_task(task)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    assert first is not None
    first_at, first_position, first_cpu, first_server = first
    run.seconds = ended - started
    run.startup_seconds = first_at - started
    run.apply_seconds = ended - first_at
    run.applied_in_window = total - first_position
    run.cpu_seconds = cpu
    run.apply_cpu_seconds = cpu - first_cpu
    if server_start is not None and server_end is not None:
        run.server_cpu_seconds = server_end - server_start
        if first_server is not None:
            run.apply_server_cpu_seconds = server_end - first_server
    run.peak_rss_mib = None if peak is None else round(peak / 1024, 1)
    return run


# -- the command -------------------------------------------------------------------------------


def main(
    events: Annotated[int, typer.Option(min=1, help="Events preloaded on the topic.")] = 1_000_000,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; the bench creates its databases), or 'sqlite' (or "
            "sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="KESSAI_PROJECTOR_BATCH_SIZE, also the baseline's batch."),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="Topic partitions (default: the setting).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days the payments are spread over.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set.")] = 7,
    timeout: Annotated[
        float, typer.Option(min=1, help="Longest the projector may take, in seconds.")
    ] = 3600.0,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for the projector (.svg, .json, or collapsed stacks)."),
    ] = None,
) -> None:
    """Benchmark the projector on a preloaded topic against raw batched upserts of its rows."""
    handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    settings = Settings()
    batch_size = batch_size or settings.projector_batch_size
    partitions = partitions or settings.topic_partitions
    topic = settings.topic
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    shape = Shape(events=events, seed=seed, days=days)
    zones = merchant_zones(shape)
    home = temporary_home(db_url, "kessai-bench-projector-")
    stores = Stores(db_url, home)
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "events": events,
            "batch_size": batch_size,
            "partitions": partitions,
            "days": days,
            "seed": seed,
            "default_merchant_time_zone": settings.default_merchant_time_zone,
        },
        "target": TARGET,
        "databases": [f"{name}_{suffix}" for suffix in ("b1", "r", "b2")],
        "directory": str(home),
    }
    mysqld = stores.server_pid()
    created: list[str] = []
    broker = EmbeddedBroker(free_port(), log_path=home / "broker.log")
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            broker.start()
            asyncio.run(create_topic(broker.bootstrap, topic, partitions))
            started = time.perf_counter()
            prepared = prepare(shape, partitions, settings.default_merchant_time_zone, progress)
            build_seconds = time.perf_counter() - started
            started = time.perf_counter()
            asyncio.run(publish(broker.bootstrap, topic, prepared.records, progress))
            publish_seconds = time.perf_counter() - started
            ends = asyncio.run(log_ends(broker.bootstrap, topic, partitions))
            if sum(ends.values()) != events:
                raise RuntimeError(
                    f"the topic holds {sum(ends.values()):,} records, not {events:,}"
                )
            prepared.records = []  # on the broker now
            report["data"] = {
                "events": events,
                "payments": prepared.payments,
                "refunds": prepared.expected.refunds,
                "merchants": prepared.merchants,
                "records_per_partition": [ends[p] for p in sorted(ends)],
                "expected": prepared.expected.as_dict(),
            }
            report["preload"] = {
                "build_seconds": round(build_seconds, 2),
                "publish_seconds": round(publish_seconds, 2),
                "publish_events_per_second": round(events / publish_seconds),
                "broker_rss_mib": _mib(memory_kib(_pid(broker), "VmRSS")),
            }
            console.print(
                f"built {events:,} events in {build_seconds:.1f} s, published them in "
                f"{publish_seconds:.1f} s ({events / publish_seconds:,.0f}/s)"
            )
            batches = upsert_batches(prepared.effects, batch_size)
            prepared.effects = []

            def baseline(label: str, suffix: str) -> dict[str, Any]:
                task = progress.add_task(label, total=None)
                try:
                    database = f"{name}_{suffix}"
                    new_read_database(stores, database, zones, created)
                    figures = raw_upserts(stores, database, batches, mysqld)
                    wrong = differences(read_side(stores, database), prepared.expected)
                    if wrong:
                        raise RuntimeError(f"{label}: the raw upserts are wrong: {wrong}")
                    return figures
                finally:
                    progress.remove_task(task)

            report["baseline_before"] = baseline("baseline (before)", "b1")
            read_db = f"{name}_r"
            read_url = new_read_database(stores, read_db, zones, created)
            metrics_port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
            env.update(
                {
                    "KESSAI_HOME": str(home),
                    "KESSAI_READ_DB_URL": read_url,
                    "KESSAI_KAFKA_BOOTSTRAP": broker.bootstrap,
                    "KESSAI_TOPIC": topic,
                    "KESSAI_TOPIC_PARTITIONS": str(partitions),
                    "KESSAI_PROJECTOR_BATCH_SIZE": str(batch_size),
                    "KESSAI_PROJECTOR_GROUP_ID": f"{name}-projector",
                    "KESSAI_PROJECTOR_METRICS_PORT": str(metrics_port),
                    "KESSAI_DEFAULT_MERCHANT_TIME_ZONE": settings.default_merchant_time_zone,
                    "KESSAI_LOG_LEVEL": "WARNING",
                }
            )
            run = run_projector(
                env=env,
                stores=stores,
                database=read_db,
                topic=topic,
                total=events,
                metrics_port=metrics_port,
                mysqld=mysqld,
                timeout=timeout,
                profile=profile,
                log=home / "projector.log",
                progress=progress,
            )
            report["broker_peak_rss_mib"] = _mib(memory_kib(_pid(broker), "VmHWM"))
            broker.stop()
            task = progress.add_task("checking the read database", total=None)
            found = read_side(stores, read_db)
            wrong = differences(found, prepared.expected)
            rows = row_differences(stores, read_db, f"{name}_b1")
            progress.remove_task(task)
            report["check"] = {
                "found": found,
                "differences": wrong,
                "rows_differing_from_baseline": rows,
                "passed": not wrong and not any(rows.values()),
            }
            if wrong or any(rows.values()):
                raise RuntimeError(
                    f"the projector's read database is wrong: {wrong}; rows that differ from "
                    f"the raw upserts': {rows}"
                )
            # The last baseline runs with no other database of this run left on the server,
            # as the first did.
            stores.drop(read_db)
            stores.drop(f"{name}_b1")
            report["baseline_after"] = baseline("baseline (after)", "b2")
        report["projector"] = _projector_figures(run, events, batch_size)
        report["figures"] = _figures(report, run, events)
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        broker.stop()
        for db in created:
            with contextlib.suppress(Exception):
                stores.drop(db)
        shutil.rmtree(home, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _pid(broker: EmbeddedBroker) -> int:
    assert broker.process is not None
    return broker.process.pid


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _projector_figures(run: Run, events: int, batch_size: int) -> dict[str, Any]:
    m = run.metrics
    batches = m.get("kessai_projector_batch_seconds_count", 0.0)
    return {
        "seconds": round(run.seconds, 3),
        "startup_seconds": round(run.startup_seconds, 3),
        "apply_seconds": round(run.apply_seconds, 3),
        "applied_in_window": run.applied_in_window,
        "cpu_seconds": round(run.cpu_seconds, 2),
        "apply_cpu_seconds": round(run.apply_cpu_seconds, 2),
        "peak_rss_mib": run.peak_rss_mib,
        "batches": int(batches),
        "mean_batch_records": round(events / batches, 1) if batches else None,
        "batch_transaction_seconds": round(m.get("kessai_projector_batch_seconds_sum", 0.0), 2),
        "applied": int(m.get("kessai_projector_events_applied_total", 0)),
        "duplicates": int(m.get("kessai_projector_duplicates_total", 0)),
        "parked": int(m.get("kessai_projector_parked_total", 0)),
        "dead_letters": int(m.get("kessai_projector_dead_letters_total", 0)),
        "batch_size_setting": batch_size,
    }


def _figures(report: dict[str, Any], run: Run, events: int) -> list[dict[str, Any]]:
    before, after = report["baseline_before"], report["baseline_after"]
    rates = [events / b["seconds"] for b in (before, after)]
    mean_rate = sum(rates) / len(rates)
    report["baseline_events_per_second"] = round(mean_rate)

    def row(
        name: str,
        seconds: float,
        count: int,
        cpu: float,
        server: float | None,
        rss: float | None,
    ) -> dict[str, Any]:
        # None when nothing was applied after the first batch seen (a run of one batch).
        rate = count / seconds if count and seconds > 0 else None
        return {
            "name": name,
            "seconds": round(seconds, 3),
            "events": count,
            "events_per_second": None if rate is None else round(rate),
            "ratio": None if rate is None else round(rate / mean_rate, 3),
            "cpu_seconds": round(cpu, 2),
            "server_cpu_seconds": None if server is None else round(server, 2),
            "peak_rss_mib": rss,
        }

    figures = [
        row("raw batched upserts (before)", before["seconds"], events,
            before["client_cpu_seconds"], before["server_cpu_seconds"], None),
        row("projector, first batch to last", run.apply_seconds, run.applied_in_window,
            run.apply_cpu_seconds, run.apply_server_cpu_seconds, run.peak_rss_mib),
        row("projector, from process start", run.seconds, events, run.cpu_seconds,
            run.server_cpu_seconds, run.peak_rss_mib),
        row("raw batched upserts (after)", after["seconds"], events,
            after["client_cpu_seconds"], after["server_cpu_seconds"], None),
    ]  # fmt: skip
    report["ratio"] = figures[1]["ratio"]
    report["ratio_from_start"] = figures[2]["ratio"]
    report["target_met"] = None if report["ratio"] is None else report["ratio"] >= TARGET
    return figures


def show(report: dict[str, Any]) -> None:
    m, s, d = report["machine"], report["settings"], report["data"]
    about = machine_table(m)
    about.add_row(
        "data",
        f"{d['events']:,} events ({d['payments']:,} payments, {d['refunds']:,} refunds, "
        f"{d['merchants']:,} merchants, {s['days']} days) on {s['partitions']} partitions",
    )
    pre = report["preload"]
    about.add_row(
        "preload",
        f"built in {pre['build_seconds']} s, published in {pre['publish_seconds']} s "
        f"({pre['publish_events_per_second']:,}/s); broker peak RSS "
        f"{report['broker_peak_rss_mib']} MiB",
    )
    p = report["projector"]
    about.add_row(
        "projector",
        f"batch size {s['batch_size']}: {p['batches']:,} batches, {p['mean_batch_records']} "
        f"records each on average, {p['batch_transaction_seconds']} s in batch transactions; "
        f"started in {p['startup_seconds']:.2f} s",
    )
    console.print(about)
    table = Table(title=f"projector over {d['events']:,} preloaded events")
    for column in (
        "what", "seconds", "events", "events/s", "of baseline rate", "CPU s", "mysqld CPU s",
        "peak RSS MiB",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "what" else "right")
    for f in report["figures"]:
        table.add_row(
            f["name"],
            f"{f['seconds']:.2f}",
            f"{f['events']:,}",
            "-" if f["events_per_second"] is None else f"{f['events_per_second']:,}",
            "-" if f["ratio"] is None else f"{f['ratio']:.2f}",
            f"{f['cpu_seconds']:.1f}",
            "-" if f["server_cpu_seconds"] is None else f"{f['server_cpu_seconds']:.1f}",
            "-" if f["peak_rss_mib"] is None else f"{f['peak_rss_mib']:.0f}",
        )
    console.print(table)
    console.print(
        "CPU s: the projector process's, or this process's for the raw upserts (the driver "
        "building the statements)."
        + (
            " SQLite runs inside those processes: its work is in their CPU; no server CPU."
            if str(m["database"]).startswith("SQLite")
            else ""
        )
    )
    targets = Table(title="the projector against the target")
    for column in ("figure", "measured", "target", "met"):
        targets.add_column(column)
    ratio, met = report["ratio"], report["target_met"]
    targets.add_row(
        "events/s, projector / raw batched upserts",
        ("- (one batch: no rate)" if ratio is None else f"{ratio:.2f}")
        + f" ({report['ratio_from_start']:.2f} from process start)",
        f">= {TARGET:.2f}",
        "-" if met is None else "[green]yes[/green]" if met else "[red]no[/red]",
    )
    targets.add_row(
        "peak RSS of the projector process", f"{p['peak_rss_mib']} MiB", "(no target)", ""
    )
    check = report["check"]
    targets.add_row(
        "read side equals what the events imply",
        "yes" if check["passed"] else "no",
        "yes",
        "[green]yes[/green]" if check["passed"] else "[red]no[/red]",
    )
    console.print(targets)


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
