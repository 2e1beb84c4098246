"""The query API's connection to the read database: read-only by construction.

SQLite: the file is opened with ``mode=ro`` (and ``PRAGMA query_only``), so the driver itself
refuses writes. A missing file is an error, never a new empty database.

MySQL: every session runs ``SET SESSION TRANSACTION READ ONLY`` on connect, so the server
refuses writes even for a privileged user. Production goes further and gives the query API a
user that holds only ``SELECT`` on the read database (``KESSAI_QUERY_DB_URL``). Sessions use
REPEATABLE READ: the statements of one request (a payment, then its refunds) read one snapshot,
and a read-only InnoDB transaction takes no locks.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool


def create_read_only_engine(url: str, *, pool_size: int) -> Engine:
    """An engine over ``url`` that cannot write, whatever the credentials allow."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("the query API reads a SQLite file; an in-memory database is empty")
        return _sqlite_read_only(Path(parsed.database).resolve(), pool_size)
    engine = sa.create_engine(
        url,
        isolation_level="REPEATABLE READ",
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"charset": "utf8mb4", "connect_timeout": 5},
    )

    @event.listens_for(engine, "connect")
    def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION TRANSACTION READ ONLY")
        cursor.close()

    return engine


def _sqlite_read_only(path: Path, pool_size: int) -> Engine:
    uri = f"file:{quote(str(path))}?mode=ro"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)

    engine = sa.create_engine(
        "sqlite+pysqlite://",
        creator=connect,
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=pool_size,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A deferred read transaction: one WAL snapshot for the statements of a request.
        conn.exec_driver_sql("BEGIN")

    return engine
