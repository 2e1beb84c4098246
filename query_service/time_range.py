"""Time ranges of dashboard queries, and the merchant-local buckets of a summary.

``from`` / ``to`` take either an ISO 8601 datetime with an offset (``2026-11-25T09:00:00+09:00``,
``...Z``), an exact instant, or a date (``2026-11-25``), a whole day of the merchant's time
zone. ``from`` is inclusive; a datetime ``to`` is exclusive, a date ``to`` includes that whole
day. Naive datetimes are refused: without an offset an instant is ambiguous.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from kessai.errors import ApiError

Bound = date | datetime
Granularity = Literal["day", "hour"]
BucketKey = date | datetime

MAX_BUCKETS: dict[Granularity, int] = {"day": 366, "hour": 24 * 31}
"""Most buckets one summary may span: a year of days, a month of hours."""

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ONE_MICROSECOND = timedelta(microseconds=1)
# Far enough from the ends of Python's calendar that a time-zone shift cannot overflow.
_EARLIEST = date(1970, 1, 1)
_LATEST = date(9998, 12, 31)
_ONE_HOUR = timedelta(hours=1)
_YEAR = r"(19[7-9][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
"""1970 to 9998, the years of ``_EARLIEST`` to ``_LATEST``."""

BOUND_SCHEMA = {
    "anyOf": [
        {"type": "string", "format": "date", "pattern": f"^{_YEAR}-[0-9]{{2}}-[0-9]{{2}}$"},
        {"type": "string", "format": "date-time", "pattern": f"^{_YEAR}-", "maxLength": 64},
    ]
}
"""``from`` / ``to`` in the OpenAPI documents: a date or an RFC 3339 date-time (which always has
an offset), written with a year from 1970 to 9998."""


def validation_error(field: str, message: str, error_type: str = "value_error") -> ApiError:
    """A 422 in the same shape FastAPI's own validation errors get."""
    return ApiError(
        422,
        "validation_error",
        f"The request is not valid: {field}: {message}",
        {"errors": [{"field": field, "message": message, "type": error_type}]},
    )


def empty_range(field: str) -> ApiError:
    """``to`` is not after ``from``: each is valid, the range they make holds no instant (a
    relation between two parameters, which no OpenAPI document can state)."""
    return validation_error(field, "must be after `from`", "range_empty")


def parse_bound(value: str | None, field: str) -> Bound | None:
    """A ``from`` / ``to`` query value: a date, an aware datetime, or absent."""
    if value is None:
        return None
    try:
        if _DATE.match(value):
            day = date.fromisoformat(value)
            if not _EARLIEST <= day <= _LATEST:
                raise _out_of_range(field)
            return day
        # RFC 3339 allows a lower-case `t` and `z`; Python's parser only the upper case.
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        raise validation_error(
            field, "must be a date (YYYY-MM-DD) or an ISO 8601 datetime with an offset"
        ) from None
    if parsed.tzinfo is None:
        raise validation_error(field, "a datetime needs an offset (Z or +09:00, for example)")
    # The date as written is what the document's pattern can state, so that is what is checked;
    # its instant is at most a day off, which the calendar's ends leave room for.
    if not _EARLIEST <= parsed.date() <= _LATEST:
        raise _out_of_range(field)
    return parsed.astimezone(UTC)


def _out_of_range(field: str) -> ApiError:
    return validation_error(field, f"must be between {_EARLIEST} and {_LATEST}")


def needs_zone(*bounds: Bound | None) -> bool:
    """Whether resolving the bounds needs the merchant's time zone (only dates do)."""
    return any(b is not None and not isinstance(b, datetime) for b in bounds)


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)


def start_instant(bound: Bound, zone: ZoneInfo | None) -> datetime:
    """The first instant a ``from`` bound includes, in UTC."""
    if isinstance(bound, datetime):
        return bound
    assert zone is not None
    return _local_midnight(bound, zone)


def end_instant(bound: Bound, zone: ZoneInfo | None) -> datetime:
    """The first instant a ``to`` bound excludes, in UTC (after the whole day for a date)."""
    if isinstance(bound, datetime):
        return bound
    assert zone is not None
    return _local_midnight(bound + timedelta(days=1), zone)


@dataclass(frozen=True, slots=True)
class Instants:
    """A half-open range ``[start, end)`` of UTC instants; either end may be open."""

    start: datetime | None
    end: datetime | None


def resolve(
    from_: Bound | None, to: Bound | None, zone: ZoneInfo | None, *, to_field: str = "query.to"
) -> Instants:
    start = start_instant(from_, zone) if from_ is not None else None
    end = end_instant(to, zone) if to is not None else None
    if start is not None and end is not None and start >= end:
        raise empty_range(to_field)
    return Instants(start, end)


def day_of(instant: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """``[start, end)`` of the local day that ``instant`` falls in, in UTC."""
    local_day = instant.astimezone(zone).date()
    return _local_midnight(local_day, zone), _local_midnight(local_day + timedelta(days=1), zone)


@dataclass(frozen=True, slots=True)
class Bucket:
    key: BucketKey
    """As stored in the totals tables: the local date, or the naive local start of the hour."""
    start: datetime
    """The bucket's first instant, in the merchant's time zone."""


def buckets(
    start: datetime, end: datetime, zone: ZoneInfo, granularity: Granularity
) -> list[Bucket]:
    """Every bucket that overlaps ``[start, end)``, oldest first.

    A range that starts or ends inside a bucket includes that whole bucket: totals are kept
    per bucket and cannot be split. Refuses (422 ``range_too_large``) more than
    ``MAX_BUCKETS[granularity]`` buckets.

    Dashboards ask for the same few ranges all day (today, the last 7 or 30 days, in a handful
    of zones), and walking 168 hours through the zone costs more than the query: the last
    ``BUCKET_CACHE_SIZE`` walks are kept (refusals are not).
    """
    return list(_buckets(start, end, zone, granularity))


BUCKET_CACHE_SIZE = 32
"""Walks kept: at most 744 hours each, a few MiB in all."""


@functools.lru_cache(maxsize=BUCKET_CACHE_SIZE)
def _buckets(
    start: datetime, end: datetime, zone: ZoneInfo, granularity: Granularity
) -> tuple[Bucket, ...]:
    limit = MAX_BUCKETS[granularity]
    last = end - _ONE_MICROSECOND
    if granularity == "day":
        first_day = start.astimezone(zone).date()
        last_day = last.astimezone(zone).date()
        count = (last_day - first_day).days + 1
        if count > limit:
            raise _too_large(granularity, limit)
        days = [first_day + timedelta(days=i) for i in range(count)]
        return tuple(Bucket(d, datetime.combine(d, time(), tzinfo=zone)) for d in days)
    # Walk real hours in UTC and label each by its local hour: a skipped local hour (spring
    # forward) never appears, a repeated one (fall back) appears once, as the table keeps it.
    local_start = start.astimezone(zone).replace(minute=0, second=0, microsecond=0)
    instant = local_start.astimezone(UTC)
    seen: dict[datetime, Bucket] = {}
    while instant <= last:
        local = instant.astimezone(zone)
        key = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        if key not in seen:
            if len(seen) == limit:
                raise _too_large(granularity, limit)
            seen[key] = Bucket(key, local.replace(minute=0, second=0, microsecond=0))
        instant += _ONE_HOUR
    return tuple(seen.values())


def _too_large(granularity: Granularity, limit: int) -> ApiError:
    unit = "days" if granularity == "day" else "hours"
    return ApiError(
        422,
        "range_too_large",
        f"A summary by {granularity} spans at most {limit} {unit}; narrow `from`/`to`.",
        {"max_buckets": limit, "granularity": granularity},
    )
