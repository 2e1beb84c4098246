"""The one source of wall-clock time: always timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Databases hand back naive datetimes for columns stored in UTC; make them aware again."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_interval(text: str, *, zero_allowed: bool = False) -> float:
    """``30s``, ``5m``, ``1h`` (or plain seconds) to seconds; ``0`` only if ``zero_allowed``."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not an interval: {text!r} (use e.g. 30s, 5m, 1h)") from None
    if value < 0 or (value == 0 and not zero_allowed):
        raise ValueError("the interval must be positive")
    return value * units[unit]
