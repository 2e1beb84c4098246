"""The reconciler bench's server helpers (also used by the other benches): connections and
databases on the server, a writer thread, CPU of both processes, the baseline scans, and the
machine."""

from __future__ import annotations

import contextlib
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymysql
import sqlalchemy as sa
from rich.table import Table

from bench.profiling import py_spy

if TYPE_CHECKING:  # bench.stores imports this module's server helpers
    from bench.stores import Stores


DEFAULT_DB_URL = "mysql+pymysql://root@127.0.0.1:3306"
SCAN_PAGE = 5_000
"""Rows per page of the baseline scans."""


# -- the server --------------------------------------------------------------------------------


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


def sampling(path: Path | None) -> contextlib.AbstractContextManager[None]:
    """py-spy attached to this process while the block runs (all threads, idle included)."""
    return py_spy(os.getpid(), path, "--idle", "--threads")
