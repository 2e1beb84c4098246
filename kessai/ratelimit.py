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
sliding window counter: two counters per key, no burst of twice the limit at a window edge.
If Redis does not answer, requests pass (payments matter more than limits) and
``kessai_rate_limit_errors_total`` counts it.

Refused requests get ``429 rate_limited`` with ``Retry-After`` and the ``RateLimit-Limit``,
``RateLimit-Remaining`` and ``RateLimit-Reset`` headers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from kessai.auth import OPEN_PATHS, Principal
from kessai.errors import ApiError, error_response
from kessai.settings import Settings

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int


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
        registry: CollectorRegistry,
        service: str,
    ) -> None:
        self.storage: Storage = (
            RedisStorage(
                f"async+{redis_url}",
                implementation="redispy",
                key_prefix=f"kessai-{service}",
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
            if redis_url
            else MemoryStorage()
        )
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.per_ip = parse(per_ip)
        self.per_key = parse(per_key)
        self.expensive = parse(expensive)
        self.refused = Counter(
            "kessai_rate_limited_total",
            "Requests refused with 429, by limit.",
            ["limit"],
            registry=registry,
        )
        self.errors = Counter(
            "kessai_rate_limit_errors_total",
            "Rate-limit checks that failed (counter storage unreachable); the request passed.",
            registry=registry,
        )

    async def hit(self, item: RateLimitItem, *identifiers: str) -> Verdict:
        try:
            if await self.strategy.hit(item, *identifiers):
                return Verdict(True, item.amount, -1, 0)
            stats = await self.strategy.get_window_stats(item, *identifiers)
        except Exception:  # the storage's own errors vary by driver: fail open, but count it
            log.warning("rate limit check failed; letting the request through", exc_info=True)
            self.errors.inc()
            return Verdict(True, item.amount, -1, 0)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return Verdict(False, item.amount, max(0, stats.remaining), reset)

    async def check(self, name: str, item: RateLimitItem, *identifiers: str) -> None:
        verdict = await self.hit(item, name, *identifiers)
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
