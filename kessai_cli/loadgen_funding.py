"""Funding the load generator's payers: a top-up of every payer's wallet before a run.

The traffic of ``kessai_cli.loadgen`` is balance payments, and a payment its payer's wallet
cannot cover is ``402 insufficient_balance``: ``fund`` tops up each payer's wallet through
``POST /v1/users/{id}/top-ups`` first (``kessai loadgen`` before its traffic, the benches before
their measured runs), over the load generator's HTTP client (``kessai_cli.http_client``).
``kessai_cli.loadgen`` re-exports ``fund`` and ``Funding``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from kessai_cli.http_client import Answer, Request, Schedule, common_headers, drive

__all__ = ["FUNDING_ATTEMPTS", "Funding", "fund"]


@dataclass(slots=True)
class Funding:
    """What topping up the payers' wallets before a run did (``fund``)."""

    users: int = 0
    """Wallets asked to be funded."""
    amount: int = 0
    """Top-up per wallet (JPY)."""
    funded: int = 0
    """Wallets topped up (201), by ``amount`` or, where that would pass the wallet's limit, up
    to the limit (``to_limit``)."""
    to_limit: int = 0
    """Of ``funded``: topped up to their limit only, with less than ``amount`` (the limit is
    below ``amount``, or an earlier run funded them)."""
    at_limit: int = 0
    """Wallets already full: 409 ``balance_limit_exceeded`` with no headroom left."""
    by_status: Counter[int] = field(default_factory=Counter)
    """The last answer of each wallet's top-up."""
    codes: Counter[str] = field(default_factory=Counter)
    """``status code`` -> count, of the last answers that were neither."""
    retried: int = 0
    """Top-ups sent again (same Idempotency-Key) after a refusal that said to retry (429,
    503) or no answer."""
    connection_errors: int = 0
    elapsed: float = 0.0

    @property
    def complete(self) -> bool:
        """Every wallet was topped up, or was full already."""
        return self.funded + self.at_limit == self.users

    def count(self, answer: Answer, *, full: bool, short: bool) -> None:
        """The last answer of one wallet's top-up: ``full``, a 409 ``balance_limit_exceeded``
        without headroom; ``short``, a top-up of less than ``amount`` (up to the limit)."""
        self.by_status[answer.status] += 1
        if answer.status == 201:
            self.funded += 1
            if short:
                self.to_limit += 1
        elif full:
            self.at_limit += 1
        else:
            code = "?"
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = str(orjson.loads(answer.body)["error"]["code"])
            self.codes[f"{answer.status} {code}"] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "amount": self.amount,
            "funded": self.funded,
            "to_limit": self.to_limit,
            "at_limit": self.at_limit,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "error_codes": dict(self.codes.most_common()),
            "retried": self.retried,
            "connection_errors": self.connection_errors,
            "elapsed_seconds": round(self.elapsed, 3),
        }


def _headroom(answer: Answer) -> int | None:
    """The headroom a 409 ``balance_limit_exceeded`` gives; None for any other answer."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = orjson.loads(answer.body)["error"]
        if answer.status == 409 and error["code"] == "balance_limit_exceeded":
            return int(error["details"]["headroom"])
    return None


@dataclass(slots=True)
class _TopUp:
    user: str
    amount: int
    key: str
    """Its Idempotency-Key: the same for every attempt of the same request."""
    attempt: int = 1
    not_before: float = 0.0


class _Queue(Schedule):
    """Closed loop over a queue of top-ups, some waiting to be retried: a connection stops
    when the queue is empty (one whose top-up is then refused puts it back and goes on)."""

    def __init__(self, todo: deque[_TopUp]) -> None:
        super().__init__(None, None)
        self.todo = todo

    async def next(self) -> float | None:
        while self.todo:
            wait = self.todo[0].not_before - time.perf_counter()
            if wait <= 0:
                return time.perf_counter()  # the caller pops it before anything else runs
            await asyncio.sleep(wait)
        return None


FUNDING_ATTEMPTS = 10
"""Tries of one wallet's top-up refused with 429/503 (each after its Retry-After, at most
1 s) or unanswered, before ``fund`` gives up on that wallet."""


async def fund(
    url: str,
    wallets_key: str,
    users: Sequence[str],
    *,
    amount: int,
    connections: int = 64,
    request_timeout: float = 30.0,
) -> Funding:
    """Top up the wallet of each of ``users`` by ``amount`` JPY through ``POST
    /v1/users/{id}/top-ups`` (``wallets_key`` must hold ``wallets:write``), closed loop over
    ``connections`` keep-alive connections. Each user's top-up has an Idempotency-Key of its
    own, new with every call; one refused for the load (429, 503) or unanswered is sent again
    with the same key, up to ``FUNDING_ATTEMPTS`` times. One that would pass the wallet's
    limit (409 ``balance_limit_exceeded``) is replaced by a top-up of the headroom the answer
    gives, if any: the wallet ends full. What the top-ups answered in the end is in the result
    (``complete``: every wallet funded or full)."""
    funding = Funding(users=len(users), amount=amount)
    common = common_headers(url, wallets_key)
    base_path = urlsplit(url).path.rstrip("/")
    prefix = f"lg-fund-{uuid.uuid4().hex[:12]}"
    todo = deque(_TopUp(user, amount, f"{prefix}-{user}") for user in users)
    unanswered: dict[str, _TopUp] = {}
    """Sent, no answer yet: after the loop, those that never got one."""
    start = time.perf_counter()

    def again(top_up: _TopUp, delay: float) -> bool:
        if top_up.attempt >= FUNDING_ATTEMPTS:
            return False
        funding.retried += 1
        retry = _TopUp(top_up.user, top_up.amount, top_up.key, top_up.attempt + 1)
        retry.not_before = time.perf_counter() + delay
        todo.append(retry)
        return True

    def request() -> Request:
        top_up = todo.popleft()
        body = orjson.dumps({"amount": top_up.amount, "currency": "JPY", "source": "bank"})
        head = (
            f"POST {base_path}/v1/users/{top_up.user}/top-ups HTTP/1.1\r\n{common}"
            f"Idempotency-Key: {top_up.key}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()

        def answered(answer: Answer, seconds: float) -> None:
            del unanswered[top_up.user]
            if answer.status in (429, 503):
                delay = 0.1
                with contextlib.suppress(ValueError, TypeError):
                    delay = min(1.0, max(0.05, float(answer.retry_after or delay)))
                if again(top_up, delay):
                    return
            room = _headroom(answer)
            if room is not None and 0 < room < top_up.amount:  # what still fits: a new request
                todo.append(_TopUp(top_up.user, room, f"{top_up.key}-to-limit"))
                return
            funding.count(answer, full=room is not None, short=top_up.amount < amount)

        unanswered[top_up.user] = top_up
        return Request(head, body, answered)

    def failed() -> None:
        funding.connection_errors += 1

    sources = [request] * min(connections, max(1, len(users)))
    while todo:
        await drive(url, _Queue(todo), sources, failed, request_timeout)
        for top_up in unanswered.values():  # the same key again: a replay if it was recorded
            again(top_up, 0.1)
        unanswered.clear()
    funding.elapsed = time.perf_counter() - start
    return funding
