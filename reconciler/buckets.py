"""A merchant's totals in its local buckets (day and hour, per currency): what the events say
they should hold, what the read database holds, and where the two differ. No I/O here.

A payment counts in the bucket (local day, local hour) of its capture, a refund in its own: the
events' ``occurred_at`` (the projector's rule: a payment row's ``created_at`` is its capture's
``occurred_at``), in the merchant's time zone (``merchants`` or the default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TypeVar
from zoneinfo import ZoneInfo

from reconciler.sums import GroupedRow, quarter_start

Sums = tuple[int, int, int, int]
K = TypeVar("K")
ZERO: Sums = (0, 0, 0, 0)
COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


LocalHour = tuple[datetime, date]
"""A bucket's local hour (naive) and local day."""


def local_hour(moment: datetime, zone: ZoneInfo) -> LocalHour:
    """The local hour (naive) and day of ``moment`` in ``zone``."""
    local = moment.astimezone(zone).replace(minute=0, second=0, microsecond=0, tzinfo=None)
    return local, local.date()


@dataclass(slots=True)
class Buckets:
    daily: dict[tuple[date, str], list[int]] = field(default_factory=dict)
    hourly: dict[tuple[datetime, str], list[int]] = field(default_factory=dict)

    def add(self, local: LocalHour, currency: str, index: int, amount: int, *, count: int) -> None:
        """Count ``count`` events of ``amount`` in all (``index`` 0: captures, 2: refunds) in
        the local hour and day ``local``."""
        hour, day = local
        day_sums = self.daily.get((day, currency))
        if day_sums is None:
            day_sums = self.daily[(day, currency)] = [0, 0, 0, 0]
        hour_sums = self.hourly.get((hour, currency))
        if hour_sums is None:
            hour_sums = self.hourly[(hour, currency)] = [0, 0, 0, 0]
        day_sums[index] += count
        day_sums[index + 1] += amount
        hour_sums[index] += count
        hour_sums[index + 1] += amount

    def copy(self) -> Buckets:
        return Buckets(
            {key: list(sums) for key, sums in self.daily.items()},
            {key: list(sums) for key, sums in self.hourly.items()},
        )


@dataclass(frozen=True, slots=True)
class Expected:
    """What the grouped sums of events say each merchant's totals hold, in its local buckets
    (built once, alongside the comparison of the payments, and used by both looks)."""

    grouped: list[GroupedRow]
    zones: dict[str, ZoneInfo]
    fallback: ZoneInfo
    buckets: dict[str, Buckets]


def expected_from(
    grouped: list[GroupedRow], zones: dict[str, ZoneInfo], fallback: ZoneInfo
) -> Expected:
    """The local buckets of ``grouped`` (merchant zones: ``zones``, else ``fallback``)."""
    buckets_of: dict[str, Buckets] = {}
    # The grouped sums repeat the same quarter hours for many merchants of a zone: each
    # quarter hour is converted to local time once per zone.
    local_of: dict[tuple[ZoneInfo, int], LocalHour] = {}
    for merchant_id, currency, quarter, index, n, amount in grouped:
        zone = zones.get(merchant_id, fallback)
        local = local_of.get((zone, quarter))
        if local is None:
            local = local_of[(zone, quarter)] = local_hour(quarter_start(quarter), zone)
        buckets = buckets_of.get(merchant_id)
        if buckets is None:
            buckets = buckets_of[merchant_id] = Buckets()
        buckets.add(local, currency, index, amount, count=n)
    return Expected(grouped, zones, fallback, buckets_of)


@dataclass(slots=True)
class Stored:
    """A merchant's stored buckets, as read from the read database."""

    daily: dict[tuple[date, str], Sums] = field(default_factory=dict)
    hourly: dict[tuple[datetime, str], Sums] = field(default_factory=dict)


def as_sums(values: Sequence[int]) -> Sums:
    return (int(values[0]), int(values[1]), int(values[2]), int(values[3]))


def diff(
    expected: Mapping[K, Sequence[int]], stored: Mapping[K, Sums]
) -> dict[K, tuple[Sums, Sums]]:
    wrong: dict[K, tuple[Sums, Sums]] = {}
    for key, sums in expected.items():
        want, have = as_sums(sums), stored.get(key, ZERO)
        if want != have:
            wrong[key] = (want, have)
    for key in stored.keys() - expected.keys():
        if stored[key] != ZERO:
            wrong[key] = (ZERO, stored[key])
    return wrong
