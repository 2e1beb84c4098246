"""Rate limits of both APIs, with the ``limits`` library.

- Per client IP, on every request but probes, metrics and docs: checked before the API key, so
  a flood of guessed keys is cut off too.
- Per API key: ``KESSAI_RATE_LIMIT_WRITES`` on the command API, ``KESSAI_RATE_LIMIT_READS`` on
  the query API.
- Per API key, on expensive reads (CSV exports, summaries and lists over long ranges):
  ``KESSAI_RATE_LIMIT_EXPENSIVE``, much tighter, so a merchant tool exporting in a loop cannot
  starve the dashboards or the payment path.

Counters live in Redis when ``KESSAI_REDIS_URL`` is set (shared by every process and replica),
in process memory otherwise (then each worker process counts on its own). The strategy is the
sliding window counter: two counters per key, no burst of twice the limit at a window edge; over
any span of t windows a key gets at most (t + 1) x the limit (README, Rate limits).

Each process talks to Redis over a bounded pool (``REDIS_MAX_CONNECTIONS``): a check waits its
turn for a connection, up to ``REDIS_POOL_WAIT_SECONDS``, rather than failing when a burst of
requests outnumbers the connections. A check that Redis cannot answer follows
``KESSAI_RATE_LIMIT_ON_ERROR``: ``allow`` lets the request through (payments matter more than
limits), ``refuse`` answers ``503 rate_limit_unavailable`` with ``Retry-After``. Either way
``kessai_rate_limit_errors_total`` counts it, a warning is logged at most every
``ERROR_LOG_INTERVAL_SECONDS``, and after ``REDIS_FAILURES_TO_SKIP`` failures in a row checks skip
Redis for ``REDIS_SKIP_SECONDS``, then one check at a time probes it again.

Refused requests get ``429 rate_limited`` with ``Retry-After`` and the ``RateLimit-Limit``,
``RateLimit-Remaining`` and ``RateLimit-Reset`` headers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import BlockingConnectionPool
from starlette.types import ASGIApp, Receive, Scope, Send

from kessai.auth import OPEN_PATHS, Principal
from kessai.errors import ApiError, error_response
from kessai.settings import Settings

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 1.0
"""Longest wait for Redis to accept a connection or answer a command. Not shorter: a check that
times out is let through (or refused), and a busy event loop alone can delay an answer by
hundreds of milliseconds."""
REDIS_MAX_CONNECTIONS = 64
"""Connections to Redis per process. One check holds one for a single round trip (a Lua
script), so a few dozen serve thousands of checks a second. redis-py's default pool raises
beyond 100 connections: 512 concurrent requests made most checks fail, each failure let its
request through, and a 300/s limit admitted 883/s."""
REDIS_POOL_WAIT_SECONDS = 2.0
"""Longest wait for a free connection: a queue this long means the process is overloaded."""
REDIS_FAILURES_TO_SKIP = 5
"""Failed checks in a row (no success between them) before checks skip Redis."""
REDIS_SKIP_SECONDS = 2.0
"""How long checks skip Redis after it failed: a dead Redis costs a few failed calls per
interval, not a connection attempt per request."""
ERROR_LOG_INTERVAL_SECONDS = 10.0
"""At most one warning per interval about checks Redis could not answer."""

STORAGE_ERRORS = (StorageError, OSError, TimeoutError)
"""What an unreachable or slow counter store raises (``wrap_exceptions=True`` wraps redis-py's
errors in ``StorageError``). Anything else is a bug and propagates."""

OnError = Literal["allow", "refuse"]


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int


class CounterStoreUnavailable(Exception):
    """The counter store could not answer this check (failed, or skipped while it is down)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate-limit counters unavailable; retry after {retry_after} s")
        self.retry_after = retry_after


class CounterStoreHealth:
    """Whether checks should call the counter store now, and the log of its failures.

    After ``failures_to_skip`` failures in a row, calls are skipped for ``skip_seconds``; then a
    single call probes the store (the others keep skipping until it answers or fails). The
    summary cache of the query API does the same with its own Redis (``query_service.cache``);
    purgatory's breaker, used for the acquirer, lets every call through while half-open.
    """

    def __init__(
        self,
        *,
        failures_to_skip: int = REDIS_FAILURES_TO_SKIP,
        skip_seconds: float = REDIS_SKIP_SECONDS,
        log_interval: float = ERROR_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.failures_to_skip = failures_to_skip
        self.skip_seconds = skip_seconds
        self.log_interval = log_interval
        self._failures_in_a_row = 0
        self._skip_until = -math.inf
        self._probing = False
        self._unlogged = 0
        self._last_log = -math.inf
        self._last_error = ""

    def may_call(self) -> bool:
        """True when this check may call the store; it is the probe if the store was down."""
        if self._failures_in_a_row < self.failures_to_skip:
            return True
        if self._probing or self.clock() < self._skip_until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures_in_a_row = 0
        self._probing = False

    def abandoned(self) -> None:
        self._probing = False

    def failed(self, exc: BaseException) -> None:
        self._failures_in_a_row += 1
        self._probing = False
        if self._failures_in_a_row >= self.failures_to_skip:
            self._skip_until = self.clock() + self.skip_seconds
        self._last_error = f"{type(exc).__name__}: {exc}"

    def retry_after(self) -> int:
        """Whole seconds until the store is called again (at least 1)."""
        return max(1, math.ceil(max(0.0, self._skip_until - self.clock())))

    def unanswered(self, on_error: OnError) -> None:
        """Note a check the store did not answer; log them at most once per interval."""
        self._unlogged += 1
        now = self.clock()
        if now - self._last_log < self.log_interval:
            return
        outcome = "let through" if on_error == "allow" else "refused (503)"
        log.warning(
            "rate-limit counters unavailable: %d check(s) since the last report, requests %s "
            "(KESSAI_RATE_LIMIT_ON_ERROR=%s); last error: %s",
            self._unlogged,
            outcome,
            on_error,
            self._last_error or "none",
        )
        self._unlogged = 0
        self._last_log = now


def redis_storage(redis_url: str, key_prefix: str) -> RedisStorage:
    """Counters in Redis over a bounded, waiting pool of connections."""
    pool = BlockingConnectionPool.from_url(
        redis_url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=REDIS_POOL_WAIT_SECONDS,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
    )
    # limits hands ``connection_pool`` to redis.asyncio.Redis (limits.aio.storage.redis.redispy);
    # its options are typed as scalars only.
    options: dict[str, Any] = {"connection_pool": pool}
    return RedisStorage(
        f"async+{redis_url}",
        wrap_exceptions=True,
        implementation="redispy",
        key_prefix=key_prefix,
        **options,
    )


class RateLimiter:
    """The limits of one service, over one storage."""

    @classmethod
    def for_service(
        cls, settings: Settings, registry: CollectorRegistry, service: str
    ) -> RateLimiter:
        per_key = settings.rate_limit_writes if service == "command" else settings.rate_limit_reads
        return cls(
            redis_url=settings.redis_url,
            per_ip=settings.rate_limit_per_ip,
            per_key=per_key,
            expensive=settings.rate_limit_expensive,
            on_error=settings.rate_limit_on_error,
            registry=registry,
            service=service,
        )

    def __init__(
        self,
        *,
        redis_url: str | None,
        per_ip: str,
        per_key: str,
        expensive: str,
        on_error: OnError = "allow",
        registry: CollectorRegistry,
        service: str,
    ) -> None:
        self.storage: Storage = (
            redis_storage(redis_url, f"kessai-{service}") if redis_url else MemoryStorage()
        )
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.per_ip = parse(per_ip)
        self.per_key = parse(per_key)
        self.expensive = parse(expensive)
        self.on_error = on_error
        self.health = CounterStoreHealth()
        self.refused = Counter(
            "kessai_rate_limited_total",
            "Requests refused with 429, by limit.",
            ["limit"],
            registry=registry,
        )
        self.errors = Counter(
            "kessai_rate_limit_errors_total",
            "Rate-limit checks the counter store did not answer (it failed, or was skipped "
            "while down); the request followed KESSAI_RATE_LIMIT_ON_ERROR.",
            registry=registry,
        )

    async def hit(self, item: RateLimitItem, *identifiers: str) -> Verdict:
        """Count one request; ``CounterStoreUnavailable`` if the store cannot answer."""
        if not self.health.may_call():
            raise self._unanswered()
        try:
            allowed = await self.strategy.hit(item, *identifiers)
            stats = None if allowed else await self.strategy.get_window_stats(item, *identifiers)
        except STORAGE_ERRORS as exc:
            self.health.failed(exc)
            raise self._unanswered() from None
        except BaseException:
            self.health.abandoned()  # cancelled: neither an answer nor a failure of the store
            raise
        self.health.succeeded()
        if stats is None:
            return Verdict(True, item.amount, -1, 0)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        # Refused means nothing was left when this request was counted; the window may have
        # slid a little by the time its stats were read, but a refusal saying "2 remaining"
        # would only confuse the client.
        return Verdict(False, item.amount, 0, reset)

    def _unanswered(self) -> CounterStoreUnavailable:
        self.errors.inc()
        self.health.unanswered(self.on_error)
        return CounterStoreUnavailable(self.health.retry_after())

    async def check(self, name: str, item: RateLimitItem, *identifiers: str) -> None:
        try:
            verdict = await self.hit(item, name, *identifiers)
        except CounterStoreUnavailable as exc:
            if self.on_error == "allow":
                return
            raise ApiError(
                503,
                "rate_limit_unavailable",
                f"Rate limits cannot be checked right now; retry after {exc.retry_after} s.",
                {"limit": name, "retry_after_seconds": exc.retry_after},
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        if verdict.allowed:
            return
        self.refused.labels(name).inc()
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests ({item}); retry after {verdict.reset_seconds} s.",
            {"limit": name, "retry_after_seconds": verdict.reset_seconds},
            headers={
                "Retry-After": str(verdict.reset_seconds),
                "RateLimit-Limit": str(verdict.limit),
                "RateLimit-Remaining": str(verdict.remaining),
                "RateLimit-Reset": str(verdict.reset_seconds),
            },
        )

    async def check_expensive(self, principal: Principal) -> None:
        await self.check("expensive", self.expensive, principal.key_id)


class RateLimitByIp:
    """ASGI middleware: the per-IP limit, before the key is checked."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        ip = client[0] if client else "unknown"
        try:
            await self.limiter.check("ip", self.limiter.per_ip, ip)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RateLimitByKey:
    """ASGI middleware, inside ``RequireApiKey``: the per-key limit of the service."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal") if scope["type"] == "http" else None
        if isinstance(principal, Principal):
            try:
                await self.limiter.check("key", self.limiter.per_key, principal.key_id)
            except ApiError as exc:
                response = error_response(
                    exc.status, exc.code, exc.message, exc.details, exc.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
