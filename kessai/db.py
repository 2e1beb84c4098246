"""Database plumbing shared by every service: column types, engines, and the naming convention.

Two dialects are supported: SQLite (the embedded default, one file per database) and MySQL /
MariaDB through PyMySQL (the production shape). Times are stored as naive UTC with microseconds;
identifiers as 16-byte binary UUIDs or case-sensitive ASCII strings, so that ``"M1"`` and
``"m1"`` are never the same merchant under MySQL's case-insensitive default collation.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine

from kessai.clock import as_utc

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class BinaryUUID(sa.TypeDecorator[uuid.UUID]):
    """A UUID stored as 16 bytes: half the index size of its text form."""

    impl = sa.LargeBinary(16)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(sa.LargeBinary(16))

    def process_bind_param(self, value: uuid.UUID | None, dialect: Dialect) -> bytes | None:
        return None if value is None else value.bytes

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> uuid.UUID | None:
        return None if value is None else uuid.UUID(bytes=bytes(value))


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware UTC datetime, stored naive in UTC with microsecond precision."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def ascii_id(length: int) -> sa.types.TypeEngine[str]:
    """A case-sensitive ASCII identifier column (merchant ids, idempotency keys, ...)."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), "mysql"
    )


def long_text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")


def is_sqlite(url: str) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


def create_db_engine(url: str, *, pool_size: int = 10, write: bool = True) -> Engine:
    """An engine tuned for kessai: durable commits, short transactions, no surprises.

    SQLite: WAL, ``synchronous=FULL`` (a committed payment survives power loss), a generous
    busy timeout, and ``BEGIN IMMEDIATE`` for write engines so a read-then-write transaction
    (the refund check) holds the write lock from its first read and cannot lose an upgrade race.
    MySQL: READ COMMITTED (fewer gap locks on the append-only tables), pre-ping, utf8mb4.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _tune_sqlite(engine, begin_immediate=write)
        return engine
    return sa.create_engine(
        url,
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"charset": "utf8mb4", "connect_timeout": 5},
    )


def _tune_sqlite(engine: Engine, *, begin_immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if begin_immediate else "BEGIN")


def upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: list[dict[str, Any]],
    *,
    replace: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
) -> None:
    """Multi-row insert that, on a primary-key conflict, overwrites the ``replace`` columns and
    adds to the ``add`` columns. Callers pass rows sorted by primary key: two connections
    upserting overlapping rows in different orders deadlock on MariaDB."""
    if not rows:
        return
    if conn.dialect.name == "mysql":
        quote = conn.dialect.identifier_preparer.quote
        # literal_column, because pymysql's executemany cannot bind column expressions here.
        updates: dict[str, Any] = {c: sa.literal_column(f"VALUES({quote(c)})") for c in replace}
        updates.update({c: sa.literal_column(f"{quote(c)} + VALUES({quote(c)})") for c in add})
        mysql_stmt = mysql.insert(table).on_duplicate_key_update(**updates)
        conn.execute(mysql_stmt, rows)
        return
    from sqlalchemy.dialects import sqlite

    stmt = sqlite.insert(table)
    set_: dict[str, Any] = {c: stmt.excluded[c] for c in replace}
    set_.update({c: table.c[c] + stmt.excluded[c] for c in add})
    conn.execute(
        stmt.on_conflict_do_update(index_elements=list(table.primary_key.columns), set_=set_),
        rows,
    )
