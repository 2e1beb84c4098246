"""Identifiers: time-ordered UUIDv7, so rows keyed by them append at the end of an index, and
an event id says when it was recorded (the reconciler's watermark relies on it: "events recorded
from T on" is one range of an index of ids, from ``bound_at(T)``).

Our own generator rather than the ``uuid6`` package's: that one makes ids monotonic by adding a
millisecond to the timestamp for every id requested within the same millisecond, so at a few
thousand ids per second its timestamps run ahead of the clock without bound (tens of seconds
after a burst), and "events after time T" stops meaning anything. This follows RFC 9562's
method 1, as Python 3.14's ``uuid.uuid7`` does: within one millisecond a 42-bit counter
(seeded at random) increments; the timestamp only moves past the clock if 2^41 ids are asked
for in one millisecond, or the clock steps back.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime

_VERSION_7_FLAGS = (7 << 76) | (0x8000 << 48)
_COUNTER_MAX = 0x3FF_FFFF_FFFF
_lock = threading.Lock()
_last_ms: int | None = None
_last_counter = 0


def _counter_and_tail() -> tuple[int, int]:
    rand = int.from_bytes(os.urandom(10), "big")
    return (rand >> 32) & 0x1FF_FFFF_FFFF, rand & 0xFFFF_FFFF  # counter's top bit left 0


def new_id() -> uuid.UUID:
    """A new UUIDv7: 48 bits of Unix milliseconds, a 42-bit counter, 32 random bits.
    Strictly increasing within this process."""
    global _last_ms, _last_counter
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if _last_ms is None or now_ms > _last_ms:
            timestamp_ms = now_ms
            counter, tail = _counter_and_tail()
        else:
            timestamp_ms = _last_ms
            counter = _last_counter + 1
            if counter > _COUNTER_MAX:
                timestamp_ms += 1
                counter, tail = _counter_and_tail()
            else:
                tail = int.from_bytes(os.urandom(4), "big")
        _last_ms, _last_counter = timestamp_ms, counter
    value = (timestamp_ms & 0xFFFF_FFFF_FFFF) << 80
    value |= (counter >> 30 & 0x0FFF) << 64
    value |= (counter & 0x3FFF_FFFF) << 32
    value |= tail
    return uuid.UUID(int=value | _VERSION_7_FLAGS)


def timestamp_ms(identifier: uuid.UUID) -> int:
    """The Unix milliseconds a UUIDv7 was made at."""
    return identifier.int >> 80


# -- watermarks: UUIDv7 bounds of a span of time ---------------------------------------------


def bound_at_ms(ms: int) -> uuid.UUID:
    """The smallest UUIDv7 of millisecond ``ms``: every id made at that millisecond or later is
    at or above it, so "ids from time T on" is one range of an index of ids."""
    return uuid.UUID(bytes=max(ms, 0).to_bytes(6, "big") + bytes(10))


def bound_at(moment: datetime) -> uuid.UUID:
    """``bound_at_ms`` of an aware moment."""
    return bound_at_ms(int(moment.timestamp() * 1000))


def time_of(watermark: str | None) -> str:
    """A watermark (a UUIDv7 as text) as a readable UTC time ("-" for none)."""
    if not watermark:
        return "-"
    moment = datetime.fromtimestamp(timestamp_ms(uuid.UUID(watermark)) / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
