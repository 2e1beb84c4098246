"""What the query API keeps between requests, and how it avoids asking twice at once.

- merchant time zones, per process, for a minute (a merchant's zone practically never changes);
- the projector's freshness, per process, for half a second;
- a merchant's summary of today, for ``summary_cache_seconds``: in Redis when one is configured
  (shared by every worker and replica), else per process. Redis failing never fails a request:
  the cache falls back to the process for a while and says so in the log.

Each cache is single-flight: concurrent misses of one key share a single load, so a burst of a
thousand identical dashboard refreshes costs one set of queries, not a thousand. All of this
runs on the event loop thread; loads hop to worker threads themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from cachetools import TTLCache
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ZONE_CACHE_SECONDS = 60.0
FRESHNESS_CACHE_SECONDS = 0.5
REDIS_RETRY_SECONDS = 5.0
"""After a Redis failure, how long the summary cache stays in the process before trying again:
a Redis that is down costs one timeout per interval, not one per request."""
SUMMARY_KEY_PREFIX = "kessai:summary"


class SingleFlight(Generic[K, V]):
    """Concurrent calls for one key share one running load and its result (or error)."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(load())
            self._running[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a caller that goes away (client disconnect) must not cancel the others' load.
        return await asyncio.shield(future)

    def _finished(self, key: K, future: asyncio.Future[V]) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an error nobody awaited is not logged twice


class ZoneCache:
    """Merchant time zones: ``merchants.time_zone``, else the default; cached per process."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[str | None]],
        *,
        default: str,
        ttl: float = ZONE_CACHE_SECONDS,
        maxsize: int = 100_000,
    ) -> None:
        self._load = load
        self._default = ZoneInfo(default)
        self._zones: TTLCache[str, ZoneInfo] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._flight: SingleFlight[str, ZoneInfo] = SingleFlight()

    async def zone_of(self, merchant_id: str) -> ZoneInfo:
        zone = self._zones.get(merchant_id)
        if zone is not None:
            return zone
        return await self._flight.run(merchant_id, lambda: self._fetch(merchant_id))

    async def _fetch(self, merchant_id: str) -> ZoneInfo:
        name = await self._load(merchant_id)
        zone = self._default
        if name:
            try:
                zone = ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                log.error("merchant %s has an unknown time zone %r", merchant_id, name)
        self._zones[merchant_id] = zone
        return zone


class FreshnessCache:
    """The read side's ``as_of``, loaded at most once per ``ttl`` seconds per process."""

    def __init__(
        self,
        load: Callable[[], Awaitable[datetime | None]],
        *,
        ttl: float = FRESHNESS_CACHE_SECONDS,
    ) -> None:
        self._load = load
        self._ttl = ttl
        self._value: datetime | None = None
        self._loaded_at = -float("inf")
        self._flight: SingleFlight[str, datetime | None] = SingleFlight()

    async def as_of(self) -> datetime | None:
        if time.monotonic() - self._loaded_at < self._ttl:
            return self._value
        return await self._flight.run("as_of", self._fetch)

    async def _fetch(self) -> datetime | None:
        # Stamped with the time the load started: the value is at least that old.
        started = time.monotonic()
        value = await self._load()
        self._value, self._loaded_at = value, started
        return value


@dataclass(frozen=True, slots=True)
class CachedSummary:
    """A summary body as computed, with the freshness it had then: serving it later reports
    the lag of that ``as_of``, so a cached answer never claims to be fresher than it is."""

    body: dict[str, Any]
    as_of: datetime | None

    def to_bytes(self) -> bytes:
        return orjson.dumps({"body": self.body, "as_of": self.as_of})

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> CachedSummary:
        value = orjson.loads(raw)
        as_of = value["as_of"]
        return cls(body=value["body"], as_of=datetime.fromisoformat(as_of) if as_of else None)


class SummaryCache:
    """Today's summary of a merchant, by granularity, for ``ttl`` seconds.

    Keys are ``{prefix}:{merchant_id}:{granularity}:{local date}``: the date rolls the key over
    at the merchant's midnight. With ``redis`` the entry is shared (``SET ... PX``); without it,
    or while Redis is failing, it lives in this process.
    """

    def __init__(
        self,
        *,
        ttl: float,
        redis: Redis | None = None,
        prefix: str = SUMMARY_KEY_PREFIX,
        maxsize: int = 10_000,
        on_lookup: Callable[[str], None] | None = None,
    ) -> None:
        self._ttl = ttl
        self._redis = redis
        self._prefix = prefix
        self._local: TTLCache[str, CachedSummary] | None = (
            TTLCache(maxsize=maxsize, ttl=ttl) if ttl > 0 else None
        )
        self._flight: SingleFlight[str, CachedSummary] = SingleFlight()
        self._redis_down_until = -float("inf")
        self._on_lookup = on_lookup or (lambda _result: None)

    def key(self, merchant_id: str, granularity: str, day: date) -> str:
        return f"{self._prefix}:{merchant_id}:{granularity}:{day.isoformat()}"

    async def get_or_compute(
        self, key: str, compute: Callable[[], Awaitable[CachedSummary]]
    ) -> CachedSummary:
        """The cached summary under ``key``, else ``compute()``'s, stored for ``ttl``.
        Concurrent callers of one key share a single lookup (one Redis GET) and computation."""
        return await self._flight.run(key, lambda: self._lookup_or_compute(key, compute))

    async def _lookup_or_compute(
        self, key: str, compute: Callable[[], Awaitable[CachedSummary]]
    ) -> CachedSummary:
        cached = await self._get(key)
        if cached is not None:
            self._on_lookup("hit")
            return cached
        self._on_lookup("miss")
        summary = await compute()
        await self._set(key, summary)
        return summary

    def _use_redis(self) -> Redis | None:
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        return self._redis

    def _redis_failed(self, action: str, exc: BaseException) -> None:
        self._on_lookup("redis_error")
        self._redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS
        log.warning(
            "Redis %s failed (%s); summaries are cached in this process for the next %.0f s",
            action,
            exc,
            REDIS_RETRY_SECONDS,
        )

    async def _get(self, key: str) -> CachedSummary | None:
        if self._ttl <= 0:
            return None
        redis = self._use_redis()
        if redis is not None:
            try:
                raw = await redis.get(key)
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("GET", exc)
            else:
                return CachedSummary.from_bytes(raw) if raw is not None else None
        return self._local.get(key) if self._local is not None else None

    async def _set(self, key: str, summary: CachedSummary) -> None:
        if self._ttl <= 0:
            return
        redis = self._use_redis()
        if redis is not None:
            try:
                await redis.set(key, summary.to_bytes(), px=max(1, round(self._ttl * 1000)))
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_failed("SET", exc)
            else:
                return
        if self._local is not None:
            self._local[key] = summary
