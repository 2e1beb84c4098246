"""Database plumbing shared by every service: column types, engines, and the naming convention.

Two dialects are supported: SQLite (the embedded default, one file per database) and MySQL /
MariaDB through PyMySQL (the production shape). Times are stored as naive UTC with microseconds;
identifiers as 16-byte binary UUIDs or case-sensitive ASCII strings, so that ``"M1"`` and
``"m1"`` are never the same merchant under MySQL's case-insensitive default collation.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine

from kessai import pymysql_escapes
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
    engine = sa.create_engine(
        url,
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"charset": "utf8mb4", "connect_timeout": 5},
    )
    if parsed.get_driver_name() == "pymysql":
        use_fast_escapes(engine)
    return engine


def use_fast_escapes(engine: Engine) -> None:
    """Open ``engine``'s PyMySQL connections as ``kessai.pymysql_escapes.Connection``: the
    same driver, escaping the values of the rows it sends several times faster."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return pymysql_escapes.Connection(*cargs, **cparams)


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
    rows: Sequence[Mapping[str, Any]],
    *,
    replace: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
) -> None:
    """``upsert_rows`` for rows given as mappings (every row with the same keys)."""
    if not rows:
        return
    columns = tuple(rows[0])
    upsert_rows(
        conn, table, columns, [tuple(r[c] for c in columns) for r in rows], replace=replace, add=add
    )


def upsert_rows(
    conn: sa.Connection,
    table: sa.Table,
    columns: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
    *,
    replace: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
) -> None:
    """Multi-row insert of ``rows`` (values in ``columns`` order) that, on a primary-key
    conflict, overwrites the ``replace`` columns and adds to the ``add`` columns; with neither,
    a plain insert. Callers pass rows sorted by primary key: two connections upserting
    overlapping rows in different orders deadlock on MariaDB.

    Values are what the table's column types take (UUIDs, aware datetimes) and go through each
    type's bind processor, exactly as through SQLAlchemy. The statement itself goes to the
    driver as text with positional parameters (PyMySQL turns an executemany of it into
    multi-row INSERTs; sqlite3 runs it per row in C): SQLAlchemy's executemany of a compiled
    insert spent more client time than the driver itself on a projector batch (per-row
    parameter dicts and bind processing; see docs/BENCHMARKS.md, "The projector").
    """
    if not rows:
        return
    sql, processors = _upsert_plan(conn.dialect, table, columns, replace, add)
    if processors:
        processed = []
        for row in rows:
            values = list(row)
            for i, process in processors:
                values[i] = process(values[i])
            processed.append(tuple(values))
        rows = processed
    conn.exec_driver_sql(sql, rows)


@functools.lru_cache(maxsize=64)
def _upsert_plan(
    dialect: Dialect,
    table: sa.Table,
    columns: tuple[str, ...],
    replace: tuple[str, ...],
    add: tuple[str, ...],
) -> tuple[str, list[tuple[int, Callable[[Any], Any]]]]:
    """The statement's text for this dialect, and the bind processors of the columns that
    have one (by position)."""
    quote = dialect.identifier_preparer.quote
    name = dialect.identifier_preparer.format_table(table)
    param = "?" if dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {name} ({', '.join(quote(c) for c in columns)}) "
        f"VALUES ({', '.join(param for _ in columns)})"
    )
    if dialect.name == "mysql":
        sets = [f"{quote(c)} = VALUES({quote(c)})" for c in replace]
        sets += [f"{quote(c)} = {quote(c)} + VALUES({quote(c)})" for c in add]
        if sets:
            sql += f" ON DUPLICATE KEY UPDATE {', '.join(sets)}"
    else:
        sets = [f"{quote(c)} = excluded.{quote(c)}" for c in replace]
        sets += [f"{quote(c)} = {name}.{quote(c)} + excluded.{quote(c)}" for c in add]
        if sets:
            keys = ", ".join(quote(c.name) for c in table.primary_key.columns)
            sql += f" ON CONFLICT ({keys}) DO UPDATE SET {', '.join(sets)}"
    processors: list[tuple[int, Callable[[Any], Any]]] = []
    for i, column in enumerate(columns):
        process = table.c[column].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((i, process))
    return sql, processors
