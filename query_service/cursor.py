"""Opaque keyset cursors: the position of the last row of a page, ``(created_at, payment_id)``
in a list of payments, the movement's ``version`` in a wallet's statement.

A cursor is base64url (unpadded) of a compact JSON array whose first element, 1, is the format
version: ``[1, <created_at as integer microseconds since the Unix epoch, UTC>, "<payment_id as
32 hex digits>"]`` for payments, ``[1, "statement", <version>]`` for a statement. It holds no
filter and no secret: it only says where the previous page stopped, and the query that uses it
still selects only the caller's merchant (or user). Anything that does not decode to exactly the
shape the list takes (a statement's cursor given to a list of payments, say) is refused with
400 ``invalid_cursor`` before any SQL runs.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kessai.errors import ApiError

CURSOR_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MICROS = int((datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH) / timedelta(microseconds=1))
CURSOR_MAX_LENGTH = 128
_TOKEN = re.compile(rf"^[A-Za-z0-9_-]{{1,{CURSOR_MAX_LENGTH}}}$")
CURSOR_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": CURSOR_MAX_LENGTH,
    "pattern": "^[A-Za-z0-9_-]+$",
}
"""A cursor in the OpenAPI documents: the shape of every cursor this module writes."""
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_STATEMENT = "statement"
MAX_VERSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the next page holds rows strictly after this in the list order
    (``created_at DESC, payment_id DESC``)."""

    created_at: datetime
    payment_id: uuid.UUID


def _encode(value: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode("ascii")


def _decode(token: str) -> list[Any]:
    """The three-element array ``token`` encodes, or ``ApiError(400, "invalid_cursor")``."""
    if not _TOKEN.match(token):
        raise _invalid()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise _invalid() from None
    if not (isinstance(value, list) and len(value) == 3):
        raise _invalid()
    return value


def encode_cursor(position: Position) -> str:
    micros = (position.created_at.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return _encode([CURSOR_VERSION, micros, position.payment_id.hex])


def decode_cursor(token: str) -> Position:
    """The position ``token`` stands for, or ``ApiError(400, "invalid_cursor")``."""
    version, micros, payment_hex = _decode(token)
    if (
        type(version) is not int
        or version != CURSOR_VERSION
        or type(micros) is not int
        or not 0 <= micros <= _MAX_MICROS
        or not isinstance(payment_hex, str)
        or not _HEX32.match(payment_hex)
    ):
        raise _invalid()
    position = Position(
        created_at=_EPOCH + timedelta(microseconds=micros), payment_id=uuid.UUID(hex=payment_hex)
    )
    # Only the exact spelling this module writes: no padding, spacing or re-encoding variants.
    if encode_cursor(position) != token:
        raise _invalid()
    return position


def encode_statement_cursor(version: int) -> str:
    """The cursor of a statement page that ended at the movement ``version``."""
    return _encode([CURSOR_VERSION, _STATEMENT, version])


def decode_statement_cursor(token: str) -> int:
    """The movement version ``token`` stands for (the next page holds the older ones), or
    ``ApiError(400, "invalid_cursor")``."""
    version, kind, movement = _decode(token)
    if (
        type(version) is not int
        or version != CURSOR_VERSION
        or kind != _STATEMENT
        or type(movement) is not int
        or not 1 <= movement <= MAX_VERSION
        or encode_statement_cursor(movement) != token
    ):
        raise _invalid()
    return movement


def _invalid() -> ApiError:
    return ApiError(
        400,
        "invalid_cursor",
        "The cursor is not one this API handed out; start again without a cursor.",
    )
