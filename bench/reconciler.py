"""How long the reconciler takes over a large store, against what touching the same data costs.

``python -m bench.reconciler [--events 1000000] [--db-url mysql+pymysql://root@127.0.0.1:3306]
[--json out.json]``

1. Creates two fresh databases on the server (write store and read database,
   ``kessai_bench_<hex>_w`` / ``_r``), migrates them with ``kessai.migrate.upgrade``.
2. Loads a consistent state in bulk: ``--events`` events in the write store (payments captured
   over ``--days`` days, some refunded once or twice; one merchant holds 30% of the payments;
   bodies built with the real event classes, ids from ``kessai.ids.new_id`` in time order; no
   outbox rows: everything is published), and the read side the projector would have written
   for them (payments, refunds, day and hour totals in each merchant's time zone, computed
   with ``kessai.ledger.apply`` as the projector does).
3. Measures, on the same data and in this order: the baseline (reading both sides in primary
   key pages through the raw driver), an incremental run with an empty watermark (every event
   is new), a full audit, the baseline again, reading + ``orjson.loads`` of every body,
   reading + ``kessai.events.parse_event`` of every body, and an incremental ``--dry-run``
   after deleting ``--drift`` read rows (restored afterwards). A consistent run that reports
   anything fails the benchmark: the loader is then wrong.
4. Prints the figures (seconds, events/s, ratio to the mean of the two baselines) and the
   machine, writes them as JSON with ``--json``; drops both databases (unless ``--keep``),
   also on failure and Ctrl-C.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs the same on the embedded default: both
databases are SQLite files in a temporary directory (under DIR), removed at the end, loaded
through the stdlib ``sqlite3`` driver's ``executemany`` (one transaction per batch, times in
SQLite's text form), and the baseline reads them with the same driver; SQLite runs inside this
process, so there is no server CPU. The drift's rows are drawn in Python (no seeded ``RAND()``).

No broker is involved: the reconciler opens a producer only to repair findings, and a
consistent state has none (the bench points it at a closed port, so a loader bug fails fast).
``--profile FILE`` attaches py-spy (``pip install py-spy``) to this process for one run
(``--profile-run``: ``incremental``, ``full`` or ``drift``; ``.svg`` flame graph, ``.json``
speedscope, anything else collapsed stacks). ``--keep`` leaves the databases, and ``--reuse
NAME`` measures them again without loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import orjson
import pymysql
import sqlalchemy as sa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kessai.db import create_db_engine
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
    parse_event,
)
from kessai.ids import new_id
from kessai.ledger import PaymentState, apply
from kessai.migrate import upgrade
from kessai.settings import Settings
from reconciler.service import Reconciler, RunResult

if TYPE_CHECKING:  # bench.stores imports this module's server helpers
    from bench.stores import Stores

DEFAULT_DB_URL = "mysql+pymysql://root@127.0.0.1:3306"
BATCH_PAYMENTS = 2_000
"""Payments per load transaction (about 2,100 events: a few multi-row INSERTs each)."""
SCAN_PAGE = 5_000
"""Rows per page of the baseline scans."""
OTHER_ZONES = ("America/New_York", "Europe/London", "Asia/Kolkata", "Australia/Sydney")

console = Console(width=None if sys.stdout.isatty() else 120)


# -- the data set ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    events: int
    seed: int = 7
    days: int = 30
    refund_share: float = 0.05
    """Share of payments refunded at least once (version 2)."""
    second_refund_share: float = 0.2
    """Share of the refunded payments refunded a second time (version 3)."""
    big_merchant_share: float = 0.3
    usd_share: float = 0.05

    @property
    def merchants(self) -> int:
        return max(10, min(2_000, self.events // 500))

    @property
    def users(self) -> int:
        return max(10, self.events // 5)


@dataclass(slots=True)
class Planned:
    """A payment to load: its capture and its refunds (time, amount, reason)."""

    at: float
    merchant: str
    user: str
    method: str
    currency: str
    amount: int
    store_id: str | None
    order_ref: str | None
    metadata: dict[str, str]
    refunds: list[tuple[float, int, str | None]]
    ids: list[uuid.UUID] = field(default_factory=list)
    """payment_id, then the event_id of each version, then each refund's refund_id."""


def merchant_ids(shape: Shape) -> list[str]:
    return [f"m{i:05d}" for i in range(shape.merchants)]


def merchant_zones(shape: Shape) -> dict[str, str]:
    """Merchants with a row in ``merchants``: every tenth, in another zone (not the big one)."""
    ids = merchant_ids(shape)
    return {
        m: OTHER_ZONES[(i // 10) % len(OTHER_ZONES)] for i, m in enumerate(ids) if i and not i % 10
    }


def plan(shape: Shape, end: datetime) -> list[Planned]:
    """Exactly ``shape.events`` events' worth of payments, captures in time order."""
    rng = random.Random(shape.seed)
    merchants = merchant_ids(shape)
    # One merchant holds big_merchant_share of the payments; the rest follow a Zipf-like tail.
    tail = [1.0 / (rank**0.8) for rank in range(1, len(merchants))]
    scale = (1.0 - shape.big_merchant_share) / sum(tail)
    weights = [shape.big_merchant_share, *(w * scale for w in tail)]
    cumulative: list[float] = []
    running = 0.0
    for w in weights:
        running += w
        cumulative.append(running)
    end_s = end.timestamp()
    span = shape.days * 86_400.0
    per_payment = 1 + shape.refund_share * (1 + shape.second_refund_share)
    step = span / max(1.0, shape.events / per_payment)
    at = end_s - span
    planned: list[Planned] = []
    total = 0
    while total < shape.events:
        at = min(at + step * 2 * rng.random(), end_s)
        merchant = rng.choices(merchants, cum_weights=cumulative)[0]
        currency = "USD" if rng.random() < shape.usd_share else "JPY"
        amount = rng.randint(100, 50_000)
        refunds: list[tuple[float, int, str | None]] = []
        room = shape.events - total - 1
        if room > 0 and rng.random() < shape.refund_share:
            first = amount if rng.random() < 0.5 or amount < 2 else rng.randint(1, amount - 1)
            when = min(at + max(1.0, rng.expovariate(1 / 86_400)), end_s)
            refunds.append((when, first, rng.choice(("damaged", "cancelled", None))))
            left = amount - first
            if room > 1 and left > 0 and rng.random() < shape.second_refund_share:
                when = min(when + max(1.0, rng.expovariate(1 / 86_400)), end_s)
                refunds.append((when, rng.randint(1, left), None))
        n = len(planned)
        planned.append(
            Planned(
                at=at,
                merchant=merchant,
                user=f"u{rng.randrange(shape.users)}",
                method="card" if rng.random() < 0.4 else "balance",
                currency=currency,
                amount=amount,
                store_id=f"s{rng.randrange(20)}" if rng.random() < 0.5 else None,
                order_ref=f"order-{n}" if rng.random() < 0.7 else None,
                metadata={"campaign": "tv-2026"} if rng.random() < 0.1 else {},
                refunds=refunds,
            )
        )
        total += 1 + len(refunds)
    return planned


def assign_ids(planned: list[Planned]) -> None:
    """UUIDv7 ids from ``new_id`` in the order the events happened (event_id order is time
    order, as in production; payment ids follow capture order, so also primary-key order)."""
    timeline = [(p.at, i, 1) for i, p in enumerate(planned)]
    timeline += [
        (when, i, v) for i, p in enumerate(planned) for v, (when, _, _) in enumerate(p.refunds, 2)
    ]
    timeline.sort()
    for _, i, version in timeline:
        p = planned[i]
        if version == 1:
            p.ids.append(new_id())  # the payment id
        p.ids.append(new_id())  # the event id of this version
        if version > 1:
            p.ids.append(new_id())  # the refund id
    # ids as appended: payment, event v1, then (event, refund) per refund; make them indexable.
    for p in planned:
        payment_id, v1, rest = p.ids[0], p.ids[1], p.ids[2:]
        p.ids = [payment_id, v1, *rest[0::2], *rest[1::2]]


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


EVENT_COLUMNS = (
    "payment_id", "version", "event_id", "event_type", "schema_version", "merchant_id",
    "amount", "currency", "occurred_at", "recorded_at", "body",
)  # fmt: skip
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


def insert_sql(table: str, columns: Sequence[str], param: str = "%s") -> str:
    """``INSERT`` of one row's values (``param``: ``%s`` for PyMySQL, ``?`` for sqlite3)."""
    names = ", ".join(f"`{c}`" for c in columns)
    return f"INSERT INTO `{table}` ({names}) VALUES ({', '.join([param] * len(columns))})"


def sqlite_value(value: Any) -> Any:
    """A value as SQLAlchemy stores it in SQLite (kessai's own writes): datetimes as
    ``YYYY-MM-DD HH:MM:SS.ffffff`` text, dates as ``YYYY-MM-DD``; anything else as it is."""
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S.%f}"
    if isinstance(value, date):
        return value.isoformat()
    return value


def sqlite_rows(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(map(sqlite_value, row)) for row in rows]


@dataclass(slots=True)
class Batch:
    events: list[tuple[Any, ...]] = field(default_factory=list)
    payments: list[tuple[Any, ...]] = field(default_factory=list)
    refunds: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True)
class Totals:
    daily: dict[tuple[str, date, str], list[int]] = field(default_factory=dict)
    hourly: dict[tuple[str, datetime, str], list[int]] = field(default_factory=dict)

    def add(self, merchant: str, local: datetime, currency: str, index: int, amount: int) -> None:
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        for sums in (
            self.daily.setdefault((merchant, local.date(), currency), [0, 0, 0, 0]),
            self.hourly.setdefault((merchant, hour, currency), [0, 0, 0, 0]),
        ):
            sums[index] += 1
            sums[index + 1] += amount


def build(planned: Sequence[Planned], zone_of: Callable[[str], ZoneInfo], totals: Totals) -> Batch:
    """The rows of some payments on both sides, exactly as the command side and the projector
    would have written them; adds their totals to ``totals``."""
    batch = Batch()
    for p in planned:
        payment_id = p.ids[0]
        zone = zone_of(p.merchant)
        captured_at = _at(p.at)
        capture = PaymentCaptured(
            event_id=p.ids[1],
            payment_id=payment_id,
            version=1,
            merchant_id=p.merchant,
            occurred_at=captured_at,
            recorded_at=captured_at,
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
        events: list[PaymentCaptured | PaymentRefunded] = [capture]
        state: PaymentState = apply(None, capture)
        totals.add(p.merchant, captured_at.astimezone(zone), p.currency, 0, p.amount)
        refunded = 0
        k = len(p.refunds)
        for n, (when, amount, reason) in enumerate(p.refunds):
            refunded += amount
            version = n + 2
            refund = PaymentRefunded(
                event_id=p.ids[version],
                payment_id=payment_id,
                version=version,
                merchant_id=p.merchant,
                occurred_at=_at(when),
                recorded_at=_at(when),
                payload=PaymentRefundedPayload(
                    refund_id=p.ids[2 + k + n],
                    amount=amount,
                    currency=p.currency,
                    refunded_amount=refunded,
                    reason=reason,
                ),
            )
            events.append(refund)
            state = apply(state, refund)
            totals.add(p.merchant, refund.occurred_at.astimezone(zone), p.currency, 2, amount)
            batch.refunds.append(
                (
                    payment_id.bytes, version, refund.payload.refund_id.bytes, p.merchant,
                    amount, p.currency, reason, _naive(refund.occurred_at),
                )
            )  # fmt: skip
        for e in events:
            batch.events.append(
                (
                    e.payment_id.bytes, e.version, e.event_id.bytes, e.event_type,
                    e.schema_version, e.merchant_id, e.payload.amount, e.payload.currency,
                    _naive(e.occurred_at), _naive(e.recorded_at), event_to_json(e).decode(),
                )
            )  # fmt: skip
        batch.payments.append(
            (
                payment_id.bytes, state.merchant_id, state.user_id, p.store_id, p.order_ref,
                state.method, state.currency, state.captured_amount, state.refunded_amount,
                state.status, state.version,
                orjson.dumps(p.metadata, option=orjson.OPT_SORT_KEYS).decode(),
                _naive(state.created_at), _naive(state.updated_at),
            )
        )  # fmt: skip
    return batch


# -- the server --------------------------------------------------------------------------------


def connect(server_url: str, database: str | None = None) -> pymysql.Connection[Any]:
    url = sa.make_url(server_url)
    return pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=database,
        charset="utf8mb4",
        autocommit=False,
    )


def database_url(server_url: str, name: str) -> str:
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def create_database(server_url: str, name: str) -> None:
    with connect(server_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")


def drop_database(server_url: str, name: str) -> None:
    with connect(server_url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


class Writer:
    """A thread sending multi-row INSERTs to one database, one transaction per item, so the
    server inserts while this process builds the next batch (on SQLite: ``executemany`` of the
    stdlib driver, one transaction per item, in a thread of this process)."""

    def __init__(self, stores: Stores, database: str) -> None:
        self.sqlite = stores.sqlite
        self.conn = stores.connect(database)
        self.items: queue.Queue[tuple[str, list[tuple[Any, ...]]] | None] = queue.Queue(4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"writer-{database}", daemon=True)
        self.thread.start()

    def put(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self.error is not None:
            raise RuntimeError(f"loading failed: {self.error!r}") from self.error
        if rows:
            self.items.put((sql, rows))

    def _run(self) -> None:
        while (item := self.items.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread stops at its next put
            try:
                cur = self.conn.cursor()
                try:
                    cur.executemany(item[0], sqlite_rows(item[1]) if self.sqlite else item[1])
                finally:
                    cur.close()
                self.conn.commit()
            except BaseException as exc:
                self.error = exc

    def close(self) -> None:
        self.items.put(None)
        self.thread.join()
        self.conn.close()
        if self.error is not None:
            raise RuntimeError(f"loading failed: {self.error!r}") from self.error


def load(shape: Shape, stores: Stores, write_db: str, read_db: str, progress: Progress) -> int:
    """Load both databases; return the number of payments."""
    settings = Settings()
    default_zone = ZoneInfo(settings.default_merchant_time_zone)
    named = {m: ZoneInfo(z) for m, z in merchant_zones(shape).items()}

    def zone_of(merchant: str) -> ZoneInfo:
        return named.get(merchant, default_zone)

    task = progress.add_task("planning", total=None)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    planned = plan(shape, end)
    assign_ids(planned)
    progress.update(task, description="loading events", total=shape.events, completed=0)
    write, read = Writer(stores, write_db), Writer(stores, read_db)
    totals = Totals()
    p = stores.param
    events_sql = insert_sql("events", EVENT_COLUMNS, p)
    payments_sql = insert_sql("payments", PAYMENT_COLUMNS, p)
    refunds_sql = insert_sql("refunds", REFUND_COLUMNS, p)
    try:
        read.put(
            insert_sql("merchants", ("merchant_id", "time_zone"), p),
            sorted(merchant_zones(shape).items()),
        )
        for start in range(0, len(planned), BATCH_PAYMENTS):
            batch = build(planned[start : start + BATCH_PAYMENTS], zone_of, totals)
            write.put(events_sql, batch.events)
            read.put(payments_sql, batch.payments)
            read.put(refunds_sql, batch.refunds)
            progress.advance(task, len(batch.events))
        for table, bucket, sums in (
            ("merchant_daily_totals", "day", totals.daily),
            ("merchant_hourly_totals", "hour", totals.hourly),
        ):
            rows: list[tuple[Any, ...]] = [(*key, *values) for key, values in sorted(sums.items())]
            sql = insert_sql(table, ("merchant_id", bucket, "currency", *TOTAL_COLUMNS), p)
            for first in range(0, len(rows), 5_000):
                read.put(sql, rows[first : first + 5_000])
    finally:
        write.close()
        read.close()
    progress.remove_task(task)
    return len(planned)


# -- measuring ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Figure:
    name: str
    seconds: float
    events: int
    client_cpu_seconds: float
    server_cpu_seconds: float | None
    payments_checked: int | None = None
    findings: dict[str, int] | None = None
    ratio: float | None = None
    """seconds / mean baseline seconds."""

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def server_pid(server_url: str) -> int | None:
    """The database server's process id, when it runs on this machine and says where."""
    host = sa.make_url(server_url).host or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    with contextlib.suppress(Exception), connect(server_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@pid_file")
        (pid_file,) = cur.fetchone() or (None,)
        return int(Path(str(pid_file)).read_text().strip())
    return None


def process_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all of its threads)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def measured(name: str, events: int, mysqld: int | None, figures: list[Figure]) -> Iterator[Figure]:
    figure = Figure(name, 0.0, events, 0.0, None)
    cpu, server, start = time.process_time(), process_cpu(mysqld), time.perf_counter()
    yield figure
    figure.seconds = time.perf_counter() - start
    figure.client_cpu_seconds = time.process_time() - cpu
    server_after = process_cpu(mysqld)
    if server is not None and server_after is not None:
        figure.server_cpu_seconds = server_after - server
    figures.append(figure)


def keyset_pages(
    cur: Any, table: str, columns: str, keys: tuple[str, ...], param: str = "%s"
) -> Iterator[Sequence[tuple[Any, ...]]]:
    """Pages of ``SCAN_PAGE`` rows of ``table`` in primary-key order (``keys``, the first
    ``len(keys)`` selected columns), each page one keyset query."""
    first, *rest = keys
    p = param
    if rest:
        (second,) = rest
        where = f"{first} > {p} OR ({first} = {p} AND {second} > {p})"
    else:
        where = f"{first} > {p}"
    order = ", ".join(keys)
    last: tuple[Any, ...] = (b"", 0)[: len(keys)]
    while True:
        params = (last[0], last[0], last[1]) if rest else (last[0],)
        cur.execute(
            f"SELECT {columns} FROM {table} WHERE {where} ORDER BY {order} LIMIT {SCAN_PAGE}",
            params,
        )
        rows = cur.fetchall()
        yield rows
        if len(rows) < SCAN_PAGE:
            return
        last = tuple(rows[-1][: len(keys)])


def scan(
    stores: Stores, write_db: str, read_db: str, parse: Callable[[str], object] | None = None
) -> int:
    """Read the events (payment_id, version, body) and the read rows in primary-key pages
    through the raw driver (PyMySQL, or the stdlib sqlite3): what touching the data the
    reconciler compares costs here."""
    touched = 0
    p = stores.param
    pk = ("payment_id", "version")
    with stores.cursor(write_db) as (_, cur):
        for rows in keyset_pages(cur, "events", "payment_id, version, body", pk, p):
            if parse is not None:
                for row in rows:
                    parse(row[2])
            touched += len(rows)
    with stores.cursor(read_db) as (_, cur):
        columns = "payment_id, captured_amount, refunded_amount, version, status"
        for rows in keyset_pages(cur, "payments", columns, ("payment_id",), p):
            touched += len(rows)
        for rows in keyset_pages(cur, "refunds", "payment_id, version, amount", pk, p):
            touched += len(rows)
    return touched


def reset_watermark(read_url: str) -> None:
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE reconciler_state SET watermark = NULL")
    finally:
        engine.dispose()


def kinds(result: RunResult) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in result.findings:
        found[f.kind] = found.get(f.kind, 0) + 1
    return found


@contextlib.contextmanager
def sampling(path: Path | None) -> Iterator[None]:
    """py-spy attached to this process while the block runs (all threads, idle included)."""
    if path is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    command = [exe, "record", "--pid", str(os.getpid()), "--output", str(path)]
    spy = subprocess.Popen(
        [*command, "--format", fmt, "--rate", "100", "--idle", "--threads"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=120)
        except subprocess.TimeoutExpired:
            spy.kill()


def run_reconciler(
    reconciler: Reconciler, *, full: bool, dry_run: bool, progress: Progress, label: str
) -> RunResult:
    task = progress.add_task(label, total=None)

    def on_progress(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    try:
        return asyncio.run(reconciler.run(full=full, dry_run=dry_run, progress=on_progress))
    finally:
        progress.remove_task(task)


def take_drift(read_url: str, count: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Delete ``count`` payment rows (and their refunds); return them, to put them back."""
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":  # no seeded RAND(): the same choice in Python
                every = [
                    row[0]
                    for row in conn.exec_driver_sql(
                        "SELECT payment_id FROM payments ORDER BY payment_id"
                    )
                ]
                ids = random.Random(seed).sample(every, min(count, len(every)))
                param = "?"
            else:
                ids = [
                    row[0]
                    for row in conn.exec_driver_sql(
                        f"SELECT payment_id FROM payments ORDER BY RAND({int(seed)})"
                        f" LIMIT {int(count)}"
                    )
                ]
                param = "%s"
            if not ids:
                return [], []
            marks = ", ".join([param] * len(ids))
            payments = list(
                conn.exec_driver_sql(
                    f"SELECT {', '.join(PAYMENT_COLUMNS)} FROM payments"
                    f" WHERE payment_id IN ({marks})",
                    tuple(ids),
                )
            )
            refunds = list(
                conn.exec_driver_sql(
                    f"SELECT {', '.join(REFUND_COLUMNS)} FROM refunds"
                    f" WHERE payment_id IN ({marks})",
                    tuple(ids),
                )
            )
            conn.exec_driver_sql(f"DELETE FROM refunds WHERE payment_id IN ({marks})", tuple(ids))
            conn.exec_driver_sql(f"DELETE FROM payments WHERE payment_id IN ({marks})", tuple(ids))
            return payments, refunds
    finally:
        engine.dispose()


def put_back(read_url: str, payments: list[Any], refunds: list[Any]) -> None:
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            param = "?" if conn.dialect.name == "sqlite" else "%s"
            for table, columns, rows in (
                ("payments", PAYMENT_COLUMNS, payments),
                ("refunds", REFUND_COLUMNS, refunds),
            ):
                if rows:
                    conn.exec_driver_sql(
                        insert_sql(table, columns, param), [tuple(r) for r in rows]
                    )
    finally:
        engine.dispose()


def scalar(url: str, sql: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(sql).scalar_one())
    finally:
        engine.dispose()


# -- the machine -------------------------------------------------------------------------------


def machine(server_url: str | None) -> dict[str, object]:
    """The machine, and the database server at ``server_url`` (None: no server)."""
    info: dict[str, object] = {
        "cores": os.cpu_count(),
        "cpu_model": None,
        "ram_gib": None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    version = pool = flush = None
    if server_url is not None:
        with connect(server_url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT VERSION(), @@innodb_buffer_pool_size, @@innodb_flush_log_at_trx_commit"
            )
            version, pool, flush = cur.fetchone() or (None, None, None)
    info["database"] = version
    info["innodb_buffer_pool_mib"] = None if pool is None else int(pool) // (1024 * 1024)
    info["innodb_flush_log_at_trx_commit"] = None if flush is None else int(flush)
    return info


def machine_table(m: dict[str, Any]) -> Table:
    """The machine rows every benchmark prints first; a benchmark adds rows of its own."""
    about = Table(title="machine", show_header=False)
    about.add_row("CPU", f"{m['cpu_model']}, {m['cores']} cores")
    about.add_row("RAM", f"{m['ram_gib']} GiB")
    about.add_row("OS", str(m["os"]))
    about.add_row("Python", str(m["python"]))
    about.add_row(
        "database",
        str(m["database"])
        if m.get("innodb_buffer_pool_mib") is None
        else f"{m['database']} (buffer pool {m['innodb_buffer_pool_mib']} MiB, "
        f"innodb_flush_log_at_trx_commit={m['innodb_flush_log_at_trx_commit']})",
    )
    about.add_row(
        "load average", f"{m['load_average']} before, {m.get('load_average_after')} after"
    )
    return about


# -- the command -------------------------------------------------------------------------------


def main(
    events: Annotated[int, typer.Option(min=1, help="Events in the write store.")] = 1_000_000,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; two databases are created there), or 'sqlite' "
            "(or sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(help="KESSAI_RECONCILE_CHUNK_SIZE for the runs (default: the setting)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days the payments are spread over.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set.")] = 7,
    drift: Annotated[
        int, typer.Option(min=0, help="Read rows deleted for the --dry-run figure (0: skip).")
    ] = 100,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for one run (.svg, .json, or collapsed stacks)."),
    ] = None,
    profile_run: Annotated[
        str, typer.Option(help="The run --profile samples: incremental, full or drift.")
    ] = "incremental",
    keep: Annotated[
        bool, typer.Option(help="Keep the databases (their names are printed).")
    ] = False,
    reuse: Annotated[
        str | None,
        typer.Option(
            help="Measure the databases NAME_w / NAME_r kept by an earlier --keep (on SQLite: "
            "DIR/NAME, the files' directory and name as --keep printed them)."
        ),
    ] = None,
) -> None:
    """Benchmark the reconciler: an incremental run over all events and a full audit."""
    from bench.stores import Stores, temporary_home

    # SIGTERM (and SIGINT, even where a shell started this with it ignored) unwinds like
    # Ctrl-C, so the databases are dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sqlite = Stores(db_url, Path()).sqlite
    home: Path | None = None
    if sqlite and reuse is not None:
        home, reuse = Path(reuse).parent, Path(reuse).name
    elif sqlite:
        home = temporary_home(db_url, "kessai-bench-reconciler-")
    stores = Stores(db_url, home or Path())
    name = reuse or f"kessai_bench_{uuid.uuid4().hex[:10]}"
    write_db, read_db = f"{name}_w", f"{name}_r"
    write_url, read_url = stores.url(write_db), stores.url(read_db)
    shape = Shape(events=events, seed=seed, days=days)
    report: dict[str, Any] = {"machine": stores.machine()}
    if home is not None:
        report["directory"] = str(home)
    created = False
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            started = time.perf_counter()
            if reuse is None:
                created = True
                stores.create(write_db)
                stores.create(read_db)
                upgrade("write", write_url)
                upgrade("read", read_url)
                payments = load(shape, stores, write_db, read_db, progress)
                load_seconds = time.perf_counter() - started
                report["load"] = {
                    "seconds": round(load_seconds, 2),
                    "events_per_second": round(events / load_seconds),
                }
                console.print(f"loaded {events:,} events in {load_seconds:.1f} s")
            else:
                events = scalar(write_url, "SELECT COUNT(*) FROM events")
                payments = scalar(write_url, "SELECT COUNT(*) FROM events WHERE version = 1")
            refunds = scalar(read_url, "SELECT COUNT(*) FROM refunds")
            report["data"] = {
                "events": events,
                "payments": payments,
                "refunds": refunds,
                "merchants": scalar(read_url, "SELECT COUNT(DISTINCT merchant_id) FROM payments"),
                "days": days,
                "seed": seed,
                "databases": [write_db, read_db],
            }
            report["figures"] = measure(
                shape=shape,
                events=events,
                stores=stores,
                write_db=write_db,
                read_db=read_db,
                chunk_size=chunk_size,
                drift=drift,
                profile=profile,
                profile_run=profile_run,
                progress=progress,
                report=report,
            )
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        if keep and home is not None:
            console.print(f"kept: --reuse {home / name}  ({write_db}.db, {read_db}.db)")
        elif keep:
            console.print(f"kept: --reuse {name}  ({write_db}, {read_db})")
        elif home is not None:
            shutil.rmtree(home, ignore_errors=True)
        elif created or reuse is not None:
            for db in (write_db, read_db):
                with contextlib.suppress(Exception):
                    drop_database(db_url, db)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def measure(
    *,
    shape: Shape,
    events: int,
    stores: Stores,
    write_db: str,
    read_db: str,
    chunk_size: int | None,
    drift: int,
    profile: Path | None,
    profile_run: str,
    progress: Progress,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    write_url, read_url = stores.url(write_db), stores.url(read_db)
    update: dict[str, object] = {
        "write_db_url": write_url,
        "read_db_url": read_url,
        # Nothing to repair in a consistent state; were there something, fail fast.
        "kafka_bootstrap": "127.0.0.1:9",
        "kafka_request_timeout_ms": 1_000,
        # No second look (it only re-checks suspects after a pause).
        "reconcile_confirm_seconds": 0.0,
    }
    if chunk_size is not None:
        update["reconcile_chunk_size"] = chunk_size
    settings = Settings().model_copy(update=update)
    report["settings"] = {
        "reconcile_chunk_size": settings.reconcile_chunk_size,
        "reconcile_confirm_seconds": settings.reconcile_confirm_seconds,
    }
    mysqld = stores.server_pid()
    figures: list[Figure] = []
    write_engine = create_db_engine(write_url)
    read_engine = create_db_engine(read_url, write=True)
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)

    def baseline(name: str, parse: Callable[[str], object] | None = None) -> None:
        task = progress.add_task(name, total=None)
        try:
            with measured(name, events, mysqld, figures):
                scan(stores, write_db, read_db, parse)
        finally:
            progress.remove_task(task)

    def reconcile(name: str, key: str, *, full: bool, dry_run: bool = False) -> RunResult:
        if not full:
            reset_watermark(read_url)
        with sampling(profile if key == profile_run else None):
            with measured(name, events, mysqld, figures) as figure:
                result = run_reconciler(
                    reconciler, full=full, dry_run=dry_run, progress=progress, label=name
                )
            figure.payments_checked = result.payments_checked
            figure.findings = kinds(result)
        return result

    try:
        baseline("baseline (before)")
        for name, key, full in (
            ("incremental", "incremental", False),
            ("full audit", "full", True),
        ):
            result = reconcile(name, key, full=full)
            if result.findings or result.outcome != "consistent":
                raise RuntimeError(
                    f"{name}: the loaded state is not consistent ({result.outcome}, "
                    f"{kinds(result)}, {result.error}): first findings {result.findings[:5]}"
                )
        baseline("baseline (after)")
        baseline("read + orjson.loads", orjson.loads)
        baseline("read + parse_event", parse_event)
        if drift:
            payments, refunds = take_drift(read_url, drift, shape.seed)
            try:
                result = reconcile(
                    "incremental, drift, --dry-run", "drift", full=False, dry_run=True
                )
            finally:
                put_back(read_url, payments, refunds)
            if kinds(result).get("missing") != len(payments):
                raise RuntimeError(f"drift: expected {len(payments)} missing, got {kinds(result)}")
    finally:
        write_engine.dispose()
        read_engine.dispose()
    base = [f.seconds for f in figures if f.name.startswith("baseline")]
    mean = sum(base) / len(base)
    report["baseline_seconds"] = round(mean, 3)
    out = []
    for f in figures:
        f.ratio = f.seconds / mean if mean > 0 else None
        row = asdict(f)
        row["events_per_second"] = round(f.events_per_second)
        for key in ("seconds", "client_cpu_seconds", "server_cpu_seconds", "ratio"):
            if row[key] is not None:
                row[key] = round(row[key], 3)
        out.append(row)
    return out


def show(report: dict[str, Any]) -> None:
    m = report["machine"]
    about = machine_table(m)
    d = report["data"]
    about.add_row(
        "data",
        f"{d['events']:,} events, {d['payments']:,} payments, {d['refunds']:,} refunds, "
        f"{d['days']} days",
    )
    if "load" in report:
        load = report["load"]
        about.add_row("load time", f"{load['seconds']} s ({load['events_per_second']:,} events/s)")
    about.add_row("chunk size", str(report["settings"]["reconcile_chunk_size"]))
    console.print(about)
    figures = Table(title=f"reconciler over {d['events']:,} events")
    for column in ("what", "seconds", "events/s", "x baseline", "client CPU s", "server CPU s"):
        figures.add_column(column, justify="left" if column == "what" else "right")
    figures.add_column("findings")
    for f in report["figures"]:
        figures.add_row(
            f["name"],
            f"{f['seconds']:.2f}",
            f"{f['events_per_second']:,}",
            f"{f['ratio']:.2f}" if f["ratio"] is not None else "-",
            f"{f['client_cpu_seconds']:.1f}",
            "-" if f["server_cpu_seconds"] is None else f"{f['server_cpu_seconds']:.1f}",
            _findings(f["findings"]),
        )
    console.print(figures)
    if str(m["database"]).startswith("SQLite"):
        console.print(
            "SQLite runs inside this process: its CPU is in the client CPU column; no server CPU."
        )


def _findings(found: dict[str, int] | None) -> str:
    if found is None:
        return "-"
    return ", ".join(f"{kind} {n}" for kind, n in sorted(found.items())) or "none"


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
