"""A load generator for the command API: campaign traffic for demos and load tests.

``kessai loadgen`` (and ``bench/writes.py``) drive ``POST /v1/payments`` and refunds over
``connections`` keep-alive HTTP/1.1 connections, closed-loop (each connection sends its next
request when the previous one is answered) or open-loop at ``rate`` requests/s (requests are
scheduled at fixed times and their latency counts from when they were due, so a slow server
is not hidden by the client waiting for it). The traffic looks like a cashback campaign:

- merchants ``shop-1`` ... ``shop-N`` follow a Zipf-like distribution, ``shop-1`` taking
  ``hot_share`` (30%); ``shop-1`` and ``shop-2`` are the merchants the development dashboard
  key of ``kessai up`` reads, so a demo's traffic shows there;
- ``refund_share`` (3%) of requests refund part of a payment accepted earlier in the run;
- ``retry_share`` (1%) repeat an earlier, answered payment request with the same
  Idempotency-Key and body (a client retry: kessai must replay it, not record it twice);
- ``top_up_share`` (none by default; 2% with ``kessai loadgen``) top up a payer's wallet
  (``POST /v1/users/{id}/top-ups``, with a ``wallets:write`` key);
- payments are balance payments by users ``u0`` ... ``u<users - 1>``, and every payment
  carries ``X-Device-Id`` (one device per user), so admission control applies.

A balance payment debits the payer's wallet, and one the wallet cannot cover is ``402
insufficient_balance``: ``fund`` (``kessai_cli/loadgen_funding.py``, re-exported here) tops up
every payer's wallet first (``kessai loadgen`` does before its traffic, the benches before
their measured runs), and the result counts the 402s.

The client is a minimal HTTP/1.1 client on asyncio streams (keep-alive, one request at a time
per connection, no pipelining). httpx.AsyncClient is the bottleneck at this concurrency:
against a bare FastAPI POST endpoint (``bench/bare_app.py``, one uvicorn worker) on a 2-core
machine, 64 connections and 4,000 requests, httpx managed 160-210 requests/s while using a
whole core (16-22 s of client CPU), and this client 3,200-5,500 requests/s with 0.3-0.4 s of
client CPU. aiohttp is not a dependency of kessai; the requests here are all alike (small
JSON, ``Content-Length`` answers), so a few lines of stream handling are enough.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from kessai_cli.http_client import Answer as Answer
from kessai_cli.http_client import Connection as Connection
from kessai_cli.http_client import HttpError as HttpError
from kessai_cli.http_client import Request as Request
from kessai_cli.http_client import Schedule as Schedule
from kessai_cli.http_client import common_headers
from kessai_cli.http_client import drive as drive
from kessai_cli.loadgen_funding import Funding as Funding
from kessai_cli.loadgen_funding import fund as fund

__all__ = [
    "USERS",
    "Answer",
    "Funding",
    "Mix",
    "Observer",
    "Request",
    "Result",
    "Run",
    "Schedule",
    "drive",
    "fund",
    "merchant_weights",
    "payers",
    "run",
    "run_sync",
]


USERS = 10_000
"""How many users pay by default: few enough that funding them all takes seconds."""


@dataclass(frozen=True, slots=True)
class Mix:
    """What the traffic looks like."""

    merchants: int = 1_000
    hot_share: float = 0.30
    """Share of payments going to the busiest merchant (``shop-1``)."""
    refund_share: float = 0.03
    retry_share: float = 0.01
    top_up_share: float = 0.0
    """Share of requests that top up a payer's wallet. None by default: the benches measure
    payments and refunds only, against a bare endpoint that has no wallet."""
    users: int = USERS
    """Payers ``u0`` ... ``u<users - 1>`` (one device each): the wallets ``fund`` tops up."""
    seed: int = 1


@dataclass(frozen=True, slots=True)
class Run:
    """Where and how hard."""

    url: str
    api_key: str
    connections: int = 64
    requests: int | None = None
    """Stop after this many requests (retries and refunds included)..."""
    duration: float | None = None
    """... or after this many seconds, whichever comes first (at least one of them). In open
    loop every request due within it is sent, however late: a server that cannot keep up
    makes the run longer, not its latencies shorter."""
    rate: float | None = None
    """Open loop at this many requests/s; None: as fast as the connections go."""
    timeout: float = 30.0
    wallets_key: str | None = None
    """The ``wallets:write`` key of the mix's top-ups; None: ``api_key`` (one key may hold
    both scopes)."""


def merchant_id(rank: int) -> str:
    """The merchant of popularity ``rank`` (0: the hot one): ``shop-1``, ``shop-2``, ..."""
    return f"shop-{rank + 1}"


def payers(mix: Mix) -> list[str]:
    """The users whose wallets the traffic of ``mix`` pays from: fund them first."""
    return [f"u{n}" for n in range(mix.users)]


def merchant_weights(mix: Mix) -> list[float]:
    """Cumulative weights: merchant 0 holds ``hot_share``, the others a Zipf tail (s = 1)."""
    if mix.merchants == 1:
        return [1.0]
    tail = [1.0 / rank for rank in range(1, mix.merchants)]
    scale = (1.0 - mix.hot_share) / sum(tail)
    cumulative, running = [], 0.0
    for w in (mix.hot_share, *(t * scale for t in tail)):
        running += w
        cumulative.append(running)
    return cumulative


@dataclass(slots=True)
class Result:
    sent: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_kind: dict[str, Counter[int]] = field(default_factory=dict)
    """kind (payment, refund, retry, top_up) -> status -> count."""
    connection_errors: int = 0
    payments: int = 0
    """Payments recorded (201, not replayed)."""
    refunds: int = 0
    """Refunds recorded (201, not replayed)."""
    top_ups: int = 0
    """Top-ups recorded (201, not replayed)."""
    insufficient_balance: int = 0
    """Payments refused with 402: the payer's wallet did not cover them."""
    replayed: int = 0
    """Answers with ``Idempotent-Replayed: true``."""
    per_merchant: Counter[str] = field(default_factory=Counter)
    """Recorded payments per merchant."""
    latencies: list[float] = field(default_factory=list)
    """Seconds, of every answered request."""
    elapsed: float = 0.0
    client_cpu_seconds: float = 0.0

    @property
    def accepted(self) -> int:
        """Writes recorded: payments, refunds and top-ups."""
        return self.payments + self.refunds + self.top_ups

    @property
    def accepted_per_second(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def answered_per_second(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency (seconds) at quantile ``q`` (0-1), nearest rank; 0 without answers."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_kind": {
                kind: {str(k): v for k, v in sorted(c.items())}
                for kind, c in sorted(self.by_kind.items())
            },
            "connection_errors": self.connection_errors,
            "payments": self.payments,
            "refunds": self.refunds,
            "top_ups": self.top_ups,
            "insufficient_balance": self.insufficient_balance,
            "replayed": self.replayed,
            "elapsed_seconds": round(self.elapsed, 3),
            "accepted_per_second": round(self.accepted_per_second, 1),
            "latency_ms": {
                "p50": round(self.percentile(0.50) * 1000, 2),
                "p90": round(self.percentile(0.90) * 1000, 2),
                "p99": round(self.percentile(0.99) * 1000, 2),
                "max": round(max(self.latencies, default=0.0) * 1000, 2),
            },
            "client_cpu_seconds": round(self.client_cpu_seconds, 2),
        }


@dataclass(slots=True)
class _Sent:
    key: str
    body: bytes
    device: str


TOP_UP_SOURCES = ("bank", "card", "convenience_store")


class _Traffic:
    """Decides each request; shared by every connection (one event loop, no locks needed)."""

    def __init__(self, run: Run, mix: Mix) -> None:
        self.mix = mix
        self.rng = random.Random(mix.seed)
        self.cumulative = merchant_weights(mix)
        self.prefix = f"lg-{uuid.uuid4().hex[:12]}"
        self.issued = 0
        self.refundable: list[tuple[str, int]] = []
        """(payment_id, amount) of recorded payments not refunded yet."""
        self.answered: deque[_Sent] = deque(maxlen=1_000)
        """Payment requests already answered with 201: candidates for a client retry."""
        parts = urlsplit(run.url)
        self.base_path = parts.path.rstrip("/")
        self.common = common_headers(run.url, run.api_key)
        self.wallets = common_headers(run.url, run.wallets_key or run.api_key)

    def _head(
        self, path: str, key: str, length: int, device: str | None, common: str | None = None
    ) -> bytes:
        extra = f"X-Device-Id: {device}\r\n" if device else ""
        return (
            f"POST {self.base_path}{path} HTTP/1.1\r\n{common or self.common}"
            f"Idempotency-Key: {key}\r\n{extra}Content-Length: {length}\r\n\r\n"
        ).encode()

    def next(self) -> tuple[str, bytes, bytes, _Sent | None]:
        """(kind, head, body, what to remember if it is a new payment)."""
        n = self.issued
        self.issued += 1
        roll = self.rng.random()
        if roll < self.mix.refund_share and self.refundable:
            i = self.rng.randrange(len(self.refundable))
            self.refundable[i], self.refundable[-1] = self.refundable[-1], self.refundable[i]
            payment_id, amount = self.refundable.pop()
            body = orjson.dumps({"amount": self.rng.randint(1, amount), "reason": "cancelled"})
            key = f"{self.prefix}-r{n}"
            return (
                "refund",
                self._head(f"/v1/payments/{payment_id}/refunds", key, len(body), None),
                body,
                None,
            )
        if roll < self.mix.refund_share + self.mix.retry_share and self.answered:
            sent = self.answered[self.rng.randrange(len(self.answered))]
            head = self._head("/v1/payments", sent.key, len(sent.body), sent.device)
            return "retry", head, sent.body, None
        # A roll of a refund or retry that cannot be made yet is a payment, never a top-up: so
        # a mix without top-ups sends exactly the traffic it sent before they existed.
        others = self.mix.refund_share + self.mix.retry_share
        if others <= roll < others + self.mix.top_up_share:
            user = self.rng.randrange(self.mix.users)
            body = orjson.dumps(
                {
                    "amount": self.rng.randint(1_000, 30_000),
                    "currency": "JPY",
                    "source": self.rng.choice(TOP_UP_SOURCES),
                }
            )
            path = f"/v1/users/u{user}/top-ups"
            head = self._head(path, f"{self.prefix}-t{n}", len(body), None, self.wallets)
            return "top_up", head, body, None
        rank = bisect.bisect_left(self.cumulative, self.rng.random() * self.cumulative[-1])
        user = self.rng.randrange(self.mix.users)
        body = orjson.dumps(
            {
                "merchant_id": merchant_id(min(rank, self.mix.merchants - 1)),
                "user_id": f"u{user}",
                "amount": self.rng.randint(100, 50_000),
                "currency": "JPY",
                "method": "balance",
                "order_ref": f"order-{n}",
            }
        )
        key = f"{self.prefix}-p{n}"
        device = f"dev-{user}"
        return (
            "payment",
            self._head("/v1/payments", key, len(body), device),
            body,
            _Sent(key, body, device),
        )


def _tally(
    result: Result,
    traffic: _Traffic,
    kind: str,
    answer: Answer,
    seconds: float,
    remember: _Sent | None,
) -> None:
    """Count one answer, and keep what later requests need from it: a created payment can be
    refunded, and an answered request can be retried by the client."""
    result.latencies.append(seconds)
    result.by_status[answer.status] += 1
    result.by_kind.setdefault(kind, Counter())[answer.status] += 1
    if answer.replayed:
        result.replayed += 1
    elif answer.status == 201 and kind == "refund":
        result.refunds += 1
    elif answer.status == 201 and kind == "top_up":
        result.top_ups += 1
    elif answer.status == 402 and kind in ("payment", "retry"):
        result.insufficient_balance += 1
    elif answer.status == 201 and kind == "payment":
        result.payments += 1
        with contextlib.suppress(ValueError, KeyError, TypeError):
            created = orjson.loads(answer.body)
            traffic.refundable.append((created["payment_id"], created["amount"]))
            result.per_merchant[created["merchant_id"]] += 1
        if remember is not None:
            traffic.answered.append(remember)


Progress = Callable[[Result, float], None]
"""Called about twice a second with the result so far and the seconds elapsed."""


Observer = Callable[[str, Answer, float], None]
"""Called with every answer: the request's kind (payment, refund, retry), the answer, and the
seconds since it was due."""


async def run(
    plan: Run,
    mix: Mix = Mix(),
    progress: Progress | None = None,
    *,
    schedule: Schedule | None = None,
    observe: Observer | None = None,
) -> Result:
    """Drive the command API at ``plan.url``; return what happened. ``schedule`` replaces the
    one ``plan`` describes (e.g. one that gives up on requests overdue for too long)."""
    if plan.requests is None and plan.duration is None:
        raise ValueError("give a number of requests, a duration, or both")
    parts = urlsplit(plan.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {plan.url}")
    traffic = _Traffic(plan, mix)
    result = Result()
    start = time.perf_counter()
    cpu = time.process_time()
    if schedule is None:
        schedule = Schedule(plan.rate, plan.duration, plan.requests)

    def request() -> Request:
        kind, head, body, remember = traffic.next()
        result.sent += 1

        def answered(answer: Answer, seconds: float) -> None:
            if observe is not None:
                observe(kind, answer, seconds)
            _tally(result, traffic, kind, answer, seconds, remember)

        return Request(head, body, answered)

    def failed() -> None:
        result.connection_errors += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            result.elapsed = time.perf_counter() - start
            if progress is not None:
                progress(result, result.elapsed)

    reporter = asyncio.create_task(report())
    try:
        await drive(plan.url, schedule, [request] * plan.connections, failed, plan.timeout)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    result.elapsed = time.perf_counter() - start
    result.client_cpu_seconds = time.process_time() - cpu
    if progress is not None:
        progress(result, result.elapsed)
    return result


def run_sync(plan: Run, mix: Mix = Mix(), progress: Progress | None = None) -> Result:
    return asyncio.run(run(plan, mix, progress))
