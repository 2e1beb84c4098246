"""CSV form of a merchant's payments: RFC 4180 quoting by the ``csv`` module, UTF-8, CRLF.

Values are written as stored: a field holding commas, quotes or line breaks is quoted, and a
reader gets back exactly the stored text. Times are ISO 8601 UTC, amounts integers in minor
units, ``metadata`` its JSON object.
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


def header() -> bytes:
    return _encode([COLUMNS])


def rows_to_csv(rows: Sequence[sa.Row[Any]]) -> bytes:
    return _encode(
        (
            str(r.payment_id),
            r.created_at.isoformat(),
            r.updated_at.isoformat(),
            r.merchant_id,
            r.user_id,
            r.store_id,
            r.order_ref,
            r.method,
            r.status,
            r.currency,
            r.captured_amount,
            r.refunded_amount,
            r.version,
            r.metadata,
        )
        for r in rows
    )


def _encode(rows: Iterable[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)  # None becomes an empty field
    return buffer.getvalue().encode("utf-8")
