"""Where a benchmark's databases live: the embedded default or a MySQL/MariaDB server.

``--db-url sqlite`` runs a benchmark on the embedded default (SQLite files in the bench's
temporary ``KESSAI_HOME``, as ``kessai up`` uses without settings); a server URL without a
database (``mysql+pymysql://root@127.0.0.1:3306``) runs it on that server, one fresh database
per name, dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from rich.console import Console

from bench.reconciler import (
    connect,
    create_database,
    database_url,
    drop_database,
    machine,
    server_pid,
)
from kessai.auth import create_key
from kessai.db import create_db_engine
from migrations import upgrade

SQLITE = "sqlite"


def temporary_home(db_url: str, prefix: str) -> Path:
    """A new temporary directory for a bench's files (its SQLite databases, logs): under DIR
    with ``--db-url sqlite:///DIR``, else under the system's temporary directory. The bench
    removes it when it ends."""
    parent = None
    if db_url.startswith("sqlite:"):
        parent = sa.make_url(db_url).database or None
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


class Stores:
    def __init__(self, db_url: str, home: Path) -> None:
        self.db_url = db_url
        self.home = home
        self.sqlite = db_url == SQLITE or db_url.startswith("sqlite")

    def url(self, name: str) -> str:
        if self.sqlite:
            return f"sqlite:///{self.home / f'{name}.db'}"
        return database_url(self.db_url, name)

    def create(self, name: str) -> None:
        if not self.sqlite:  # a SQLite file is created by its first migration
            create_database(self.db_url, name)

    def drop(self, name: str) -> None:
        """Drop database ``name``; on SQLite, delete its file (and its WAL and shared memory):
        the rest of the bench's temporary home goes when the bench ends."""
        if not self.sqlite:
            drop_database(self.db_url, name)
            return
        for suffix in ("", "-wal", "-shm", "-journal"):
            (self.home / f"{name}.db{suffix}").unlink(missing_ok=True)

    def connect(self, name: str) -> Any:
        """A DB-API connection (``%s`` parameters on a server, ``?`` on SQLite: see
        ``param``), transactions committed explicitly."""
        if not self.sqlite:
            return connect(self.db_url, name)
        conn = sqlite3.connect(self.home / f"{name}.db", timeout=30, check_same_thread=False)
        # The pragmas of the project's own SQLite engines (kessai/db.py).
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    @contextlib.contextmanager
    def cursor(self, name: str) -> Iterator[tuple[Any, Any]]:
        """``(connection, cursor)`` on database ``name``, both closed after the block."""
        conn = self.connect(name)
        try:
            cursor = conn.cursor()
            try:
                yield conn, cursor
            finally:
                cursor.close()
        finally:
            conn.close()

    @property
    def param(self) -> str:
        return "?" if self.sqlite else "%s"

    def server_pid(self) -> int | None:
        """The database server's process (None on SQLite: it runs inside the services)."""
        return None if self.sqlite else server_pid(self.db_url)

    def machine(self) -> dict[str, object]:
        if not self.sqlite:
            return machine(self.db_url)
        info = machine(None)
        info["database"] = f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL)"
        return info


def prepare_stores(
    stores: Stores, names: tuple[str, str, str], created: list[str], label: str, *scopes: str
) -> list[str]:
    """Create and migrate the bench's write store, key store and read database (``names``, in
    that order; each joins ``created`` as soon as it exists, so the caller's cleanup drops it
    whatever fails next), then one API key per scope, named ``label``: the keys, in order."""
    write_db, keys_db, read_db = names
    for db in names:
        stores.create(db)
        created.append(db)
    upgrade("write", stores.url(write_db))
    upgrade("keys", stores.url(keys_db))
    upgrade("read", stores.url(read_db))
    engine = create_db_engine(stores.url(keys_db), pool_size=1)
    try:
        return [create_key(engine, [scope], label)[1] for scope in scopes]
    finally:
        engine.dispose()


def scalar_of(stores: Stores, database: str, sql: str) -> int:
    with stores.cursor(database) as (_, cursor):
        cursor.execute(sql)
        row = cursor.fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def scratch(stores: Stores, home: Path) -> Iterator[list[str]]:
    """The names of the databases a run creates (it appends each to the list it is given),
    dropped, and its directory removed, when the block ends: also after a failure or Ctrl-C.
    The logs go too: a failure's message already carries the tail of the log that says why."""
    created: list[str] = []
    try:
        yield created
    finally:
        for db in created:
            with contextlib.suppress(Exception):
                stores.drop(db)
        shutil.rmtree(home, ignore_errors=True)


def finish(
    report: dict[str, Any],
    show: Callable[[dict[str, Any]], None],
    json_path: Path | None,
    console: Console,
) -> None:
    """Note the load after the run, print the report, and write it as JSON if asked."""
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    show(report)
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        console.print(f"figures written to {json_path}")
