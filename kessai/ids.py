"""Identifiers: time-ordered UUIDv7, so rows keyed by them append at the end of an index."""

from __future__ import annotations

import uuid

import uuid6


def new_id() -> uuid.UUID:
    """A new UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then randomness."""
    return uuid.UUID(bytes=uuid6.uuid7().bytes)
