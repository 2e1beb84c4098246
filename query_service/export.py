"""CSV form of a merchant's payments: RFC 4180 quoting by the ``csv`` module, UTF-8, CRLF.

Values are written as stored: a field holding commas, quotes or line breaks is quoted, and a
reader gets back exactly the stored text, with one exception. A text cell that begins with
``=``, ``+``, ``-``, ``@``, tab or carriage return is written with a leading ``'``: a
spreadsheet opening the file would otherwise run it as a formula (CSV injection, OWASP), and
clients choose ``user_id``, ``store_id``, ``order_ref`` and ``metadata``. Numbers are never
prefixed. Times are ISO 8601 UTC, amounts integers in minor units, ``metadata`` its JSON
object.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

COLUMNS: tuple[str, ...] = (
    "payment_id",
    "created_at",
    "updated_at",
    "merchant_id",
    "user_id",
    "store_id",
    "order_ref",
    "method",
    "status",
    "currency",
    "captured_amount",
    "refunded_amount",
    "version",
    "metadata",
)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet take a cell for a formula."""


def text_cell(value: str | None) -> str | None:
    """``value`` as a spreadsheet shows it, never runs it: prefixed with ``'`` if it starts
    like a formula."""
    if value is not None and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def header() -> bytes:
    return _encode([COLUMNS])


def rows_to_csv(rows: Sequence[sa.Row[Any]]) -> bytes:
    return _encode(
        (
            str(r.payment_id),
            r.created_at.isoformat(),
            r.updated_at.isoformat(),
            text_cell(r.merchant_id),
            text_cell(r.user_id),
            text_cell(r.store_id),
            text_cell(r.order_ref),
            text_cell(r.method),
            text_cell(r.status),
            text_cell(r.currency),
            r.captured_amount,
            r.refunded_amount,
            r.version,
            text_cell(r.metadata),
        )
        for r in rows
    )


def _encode(rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # None becomes an empty field
    return buffer.getvalue().encode("utf-8")
