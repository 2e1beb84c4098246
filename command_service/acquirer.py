"""The card acquirer: authorizations over HTTP, behind a strict timeout, a bulkhead and a
circuit breaker, so that a slow or dead acquirer costs card payments an error and nothing else.

Protocol (README, "Card payments")::

    POST {KESSAI_ACQUIRER_URL}/authorizations
    Idempotency-Key: <64 hex characters, see ``acquirer_key``>
    {"amount": 1200, "currency": "JPY", "merchant_id": "shop-1", "reference": "order 42"}

    200 or 201 {"authorization_id": "...", "status": "approved" | "declined"}

The acquirer answers a repeated Idempotency-Key with its first answer, so a call whose answer
was lost (a timeout, a reset connection) can be made again without a second authorization.
Anything else (no answer in time, a connection error, another status, a malformed body) is a
failed call.

- Timeout: every call runs under ``asyncio.timeout`` (a hard limit: httpx's own timeouts are
  per read or write, and a server trickling bytes would never trip them).
- Bulkhead: at most ``max_concurrency`` calls in flight (a semaphore, and as many pooled
  connections). A call waits for a slot at most the timeout, then fails as ``busy``. Waiting
  costs no thread and no database connection: the route holds neither while it authorizes.
- Circuit breaker: after ``breaker_failures`` consecutive failed calls it opens; card payments
  then fail at once (``circuit_open``) for ``breaker_reset_seconds``; then one probe call goes
  through: its success closes the breaker, its failure opens it again.
- Retries: only of calls that may succeed when repeated (timeouts, connection errors, 5xx,
  409, 429), up to ``max_attempts`` in all, with the same Idempotency-Key; a retry never
  reaches an open breaker.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import httpx
import orjson
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import HALF_OPENED, OPENED, OpenedState
from pydantic import BaseModel, ConfigDict, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from kessai.events import AuthorizationId
from kessai.settings import Settings

if TYPE_CHECKING:
    from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker

log = logging.getLogger(__name__)

BREAKER_STATES = ("closed", "open", "half_open")
UnavailableReason = Literal["circuit_open", "busy", "timeout", "error"]
_RETRYABLE_STATUS = frozenset({409, 429})
_MESSAGES: dict[str, str] = {
    "circuit_open": "The card acquirer is failing; card payments are paused. Retry later.",
    "busy": "Too many card authorizations are waiting for the acquirer. Retry later.",
    "timeout": "The card acquirer did not answer in time. Retry with the same Idempotency-Key.",
    "error": "The card acquirer failed. Retry with the same Idempotency-Key.",
}


def acquirer_key(client_id: str, idempotency_key: str, request: str) -> str:
    """The Idempotency-Key sent to the acquirer for one kessai request (SHA-256, hex).

    Derived from the API client, its Idempotency-Key and the normalized request: the same
    request sent again derives the same key, so the acquirer answers with the authorization
    it already made; two clients using the same key, or a key used again for another request
    after kessai forgot it, derive different ones. The client's key itself never leaves."""
    return hashlib.sha256(orjson.dumps([client_id, idempotency_key, request])).hexdigest()


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    idempotency_key: str
    amount: int
    currency: str
    merchant_id: str
    reference: str | None


class Authorization(BaseModel):
    """The acquirer's answer: a definite yes or no."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    authorization_id: AuthorizationId
    status: Literal["approved", "declined"]

    @property
    def approved(self) -> bool:
        return self.status == "approved"


class AcquirerUnavailable(Exception):
    """No answer from the acquirer: nothing may be captured. ``retry_after`` in seconds."""

    def __init__(self, reason: UnavailableReason, retry_after: int = 1) -> None:
        super().__init__(_MESSAGES[reason])
        self.reason: UnavailableReason = reason
        self.retry_after = retry_after


class _CallFailed(Exception):
    """One call failed; the breaker counts it."""

    def __init__(self, reason: Literal["timeout", "error"], retryable: bool, detail: str) -> None:
        super().__init__(detail)
        self.reason: Literal["timeout", "error"] = reason
        self.retryable = retryable


class Acquirer:
    """The client of the acquirer: one per process, created and closed in the app lifespan."""

    def __init__(
        self,
        *,
        url: str,
        timeout: float,
        max_concurrency: int,
        max_attempts: int,
        breaker: AsyncCircuitBreaker,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=url,
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            headers={"User-Agent": "kessai"},
        )
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_attempts = max_attempts
        self._breaker = breaker
        self._probing = False
        self.in_flight = 0
        """Calls holding a bulkhead slot now."""
        self._latency = Histogram(
            "kessai_acquirer_request_duration_seconds",
            "Acquirer calls by outcome (approved, declined, timeout, error).",
            ["outcome"],
            registry=None,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )
        self._rejected = Counter(
            "kessai_acquirer_rejected",
            "Authorizations refused without calling the acquirer (circuit_open, busy).",
            ["reason"],
            registry=None,
        )
        self.collector = _AcquirerCollector(self)

    @classmethod
    async def start(cls, settings: Settings) -> Acquirer | None:
        """The acquirer of ``settings``; ``None`` when ``KESSAI_ACQUIRER_URL`` is unset."""
        if settings.acquirer_url is None:
            return None
        # The circuit breaker is purgatory's: asyncio-native (an ``async with`` around the
        # call), typed, without dependencies, its state readable (metrics, Retry-After) and
        # kept in memory or Redis, maintained (3.x, 2024). aiobreaker has had no release since
        # 2021; pybreaker runs async calls only on Tornado's coroutines, not asyncio. One gap,
        # closed here: purgatory lets every call through while half-open, so a hanging
        # acquirer would get a stampede of probes; ``Acquirer`` admits one probe at a time.
        breakers = AsyncCircuitBreakerFactory(
            default_threshold=settings.acquirer_breaker_failures,
            default_ttl=settings.acquirer_breaker_reset_seconds,
        )
        await breakers.initialize()
        return cls(
            url=settings.acquirer_url,
            timeout=settings.acquirer_timeout_ms / 1000,
            max_concurrency=settings.acquirer_max_concurrency,
            max_attempts=settings.acquirer_max_attempts,
            breaker=await breakers.get_breaker("acquirer"),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` (calls fail at once) or ``half_open`` (the next call probes).

        purgatory turns an open breaker half-open lazily, on the first call after its reset
        time; this reports what that call would find."""
        context = self._breaker.context
        if context.state == OPENED:
            return "half_open" if time.time() > self._reopens_at() else "open"
        return "half_open" if context.state == HALF_OPENED else "closed"

    def _reopens_at(self) -> float:
        context = self._breaker.context
        return (context.opened_at or 0.0) + context.ttl

    def _refuse_if_open(self) -> None:
        state = self.breaker_state
        if state == "open" or (state == "half_open" and self._probing):
            self._rejected.labels("circuit_open").inc()
            wait = max(1, math.ceil(self._reopens_at() - time.time()))
            raise AcquirerUnavailable("circuit_open", retry_after=wait)

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        """The acquirer's answer, or ``AcquirerUnavailable``. Never holds a thread."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, _CallFailed) and exc.retryable),
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(request)
        except _CallFailed as exc:
            log.warning("acquirer call failed: %s: %s", exc.reason, exc)
            raise AcquirerUnavailable(exc.reason) from exc
        raise AssertionError("unreachable: AsyncRetrying returns or raises")  # pragma: no cover

    async def _attempt(self, request: AuthorizationRequest) -> Authorization:
        self._refuse_if_open()  # fail fast, without waiting for a slot
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            self._rejected.labels("busy").inc()
            raise AcquirerUnavailable("busy") from None
        self.in_flight += 1
        try:
            # The breaker may have opened while this call waited. From here to entering the
            # breaker nothing awaits, so checking and claiming the probe cannot interleave.
            self._refuse_if_open()
            probe = self.breaker_state == "half_open"
            if probe:
                self._probing = True
            try:
                # A failure (``_CallFailed``, or a cancellation) counts against the breaker; an
                # answer, approval or decline, is a success.
                async with self._breaker:
                    return await self._call(request)
            except OpenedState:  # defensive: the check above already refused
                raise AcquirerUnavailable("circuit_open") from None
            finally:
                if probe:
                    self._probing = False
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def _call(self, request: AuthorizationRequest) -> Authorization:
        started = time.perf_counter()
        outcome = "error"
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._client.post(
                        "/authorizations",
                        json={
                            "amount": request.amount,
                            "currency": request.currency,
                            "merchant_id": request.merchant_id,
                            "reference": request.reference,
                        },
                        headers={"Idempotency-Key": request.idempotency_key},
                    )
            except (TimeoutError, httpx.TimeoutException) as exc:
                outcome = "timeout"
                raise _CallFailed("timeout", True, f"no answer within {self._timeout} s") from exc
            except httpx.HTTPError as exc:
                raise _CallFailed("error", True, f"{type(exc).__name__}: {exc}") from exc
            if response.status_code not in (200, 201):
                status = response.status_code
                retryable = status >= 500 or status in _RETRYABLE_STATUS
                raise _CallFailed("error", retryable, f"HTTP {status}")
            try:
                answer = Authorization.model_validate_json(response.content)
            except ValidationError as exc:
                raise _CallFailed("error", False, "malformed answer") from exc
            outcome = answer.status
            return answer
        finally:
            self._latency.labels(outcome).observe(time.perf_counter() - started)


class _AcquirerCollector(Collector):
    """The acquirer's metrics, read on scrape: breaker state, calls in flight, latency."""

    def __init__(self, acquirer: Acquirer) -> None:
        self._acquirer = acquirer

    def collect(self) -> Iterator[Metric]:
        acquirer = self._acquirer
        state = GaugeMetricFamily(
            "kessai_acquirer_circuit_state",
            "1 for the acquirer circuit breaker's state: closed, open (card payments fail at "
            "once) or half_open (the next call probes).",
            labels=["state"],
        )
        current = acquirer.breaker_state
        for name in BREAKER_STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield GaugeMetricFamily(
            "kessai_acquirer_in_flight",
            "Acquirer calls holding a bulkhead slot.",
            value=float(acquirer.in_flight),
        )
        yield from acquirer._latency.collect()
        yield from acquirer._rejected.collect()


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning("acquirer call %d failed, retrying (same key): %r", state.attempt_number, exc)
