"""PyMySQL with its escaping of the values a payment writes done at C speed.

PyMySQL sends every statement as text: each value of each row is escaped in Python first. For
a string it calls ``str.translate`` with a table that maps quotes and backslashes to two
characters, which CPython can only do one character at a time through the table (about 19 µs
for a 545-byte event body, measured); a payment writes its event's JSON body twice (its table
and the outbox), a balance payment its wallet event's twice more. Seven ``str.replace`` calls
produce the same text in about 3 µs. Naive datetimes (every time column: ``kessai.db``
stores UTC naive) and plain ints take the same short way round ``escape_item``'s look-ups.

Everything else, and any server in ``NO_BACKSLASH_ESCAPES`` mode, goes to PyMySQL unchanged.
The output is PyMySQL's exactly (``tests/unit/test_pymysql_escapes.py`` compares them over
generated strings, and ``tests/integration/test_db_escapes.py`` round-trips hostile strings
through MariaDB). Written here rather than taken from a library because the library is the
slow part; ``mysqlclient`` (C) would remove the need.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymysql.connections import Connection as _PyMySQLConnection
from pymysql.constants import SERVER_STATUS

# PyMySQL's own table (pymysql.converters._escape_table), as replacements; the backslash first
# so the backslashes the others add are not doubled.
_REPLACEMENTS = (
    ("\\", "\\\\"),
    ("\0", "\\0"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\032", "\\Z"),
    ('"', '\\"'),
    ("'", "\\'"),
)


def escape_string(value: str) -> str:
    """``pymysql.converters.escape_string``'s result, without its per-character table."""
    for char, escaped in _REPLACEMENTS:
        value = value.replace(char, escaped)
    return value


class Connection(_PyMySQLConnection):
    """A PyMySQL connection whose ``escape`` takes a short way for strings, ints and naive
    datetimes (what kessai's rows hold), and PyMySQL's own for everything else."""

    def escape(self, obj: Any, mapping: Any = None) -> str:
        kind = type(obj)
        if mapping is None:
            if kind is str:
                status: int = self.server_status  # type: ignore[attr-defined]  # the handshake's
                if not status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
                    return "'" + escape_string(obj) + "'"
            elif kind is int:
                return str(obj)
            elif kind is datetime and obj.tzinfo is None:
                # PyMySQL's format: microseconds only when there are some, as isoformat.
                moment: datetime = obj
                return f"'{moment.isoformat(' ')}'"
        return str(super().escape(obj, mapping))
