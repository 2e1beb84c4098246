"""An open loop that gives up like a client, and what it saw: admitted, refused, timed out.

Used by ``bench.overload`` (the command API past its capacity, shed or queued) against the API
directly and through the proxy in front of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from typing import Any

import orjson
import uvloop

from kessai_cli import loadgen


class GivingUp(loadgen.Schedule):
    """Open loop, except that a request overdue by more than ``give_up`` seconds when a
    connection is free for it is not sent: its client has given up (a time-out). Without
    this, a server that cannot keep up makes the run last until it has served every request
    ever due."""

    def __init__(self, rate: float, duration: float, give_up: float) -> None:
        super().__init__(rate, duration)
        self.give_up = give_up
        self.abandoned = 0

    async def next(self) -> float | None:
        while (due := await super().next()) is not None:
            if time.perf_counter() - due <= self.give_up:
                return due
            self.abandoned += 1
        return None


@dataclasses.dataclass
class Tally:
    admitted: list[float] = dataclasses.field(default_factory=list)
    refused: list[float] = dataclasses.field(default_factory=list)
    by_status: Counter[int] = dataclasses.field(default_factory=Counter)
    by_code: Counter[str] = dataclasses.field(default_factory=Counter)
    actionable: int = 0
    """Refusals that are 503 or 429 with Retry-After."""
    other: int = 0
    """4xx answers other than 429."""
    late: int = 0
    """Answers that came after the client's time-out."""
    payments_seen: int = 0
    """Payments the client saw created (201, not a replay) within its time-out."""

    def observe(self, timeout: float) -> loadgen.Observer:
        def observe(kind: str, answer: loadgen.Answer, seconds: float) -> None:
            self.by_status[answer.status] += 1
            if seconds > timeout:
                self.late += 1
            if 200 <= answer.status < 300:
                self.admitted.append(seconds)
                if kind == "payment" and answer.status == 201 and not answer.replayed:
                    self.payments_seen += seconds <= timeout
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.by_code[orjson.loads(answer.body)["error"]["code"]] += 1
            if answer.status < 500 and answer.status != 429:
                # An answer about the request itself, not the load: e.g. a client retry
                # finding its first attempt still in flight (409).
                self.other += 1
                return
            self.refused.append(seconds)
            if answer.status in (429, 503) and answer.retry_after:
                self.actionable += 1

        return observe


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 1)


def open_loop(
    url: str,
    key: str,
    rate: float,
    seconds: float,
    connections: int,
    timeout: float,
    seed: int,
    *,
    users: int = loadgen.USERS,
) -> tuple[dict[str, Any], int]:
    """One open-loop run (balance payments by ``users`` payers, funded beforehand); its
    figures and the payments the client saw created."""
    tally = Tally()
    schedule = GivingUp(rate, seconds, timeout)
    plan = loadgen.Run(url, key, connections=connections, rate=rate, duration=seconds)
    plan = dataclasses.replace(plan, timeout=timeout)
    # uvloop, as the servers run: the client must offer ten times a core's capacity from one
    # core; the stdlib loop cost it about 15% more CPU per request there (docs/BENCHMARKS.md).
    mix = loadgen.Mix(seed=seed, users=users)
    result = uvloop.run(loadgen.run(plan, mix, schedule=schedule, observe=tally.observe(timeout)))
    refusals = len(tally.refused)
    timeouts = result.connection_errors + schedule.abandoned + tally.late
    figures = {
        "offered_per_second": round(rate, 1),
        "sent": result.sent,
        "sent_per_second": round(result.sent / result.elapsed, 1) if result.elapsed else 0.0,
        "elapsed_seconds": round(result.elapsed, 2),
        "by_status": {str(k): v for k, v in sorted(tally.by_status.items())},
        "refusal_codes": dict(tally.by_code.most_common()),
        "admitted": len(tally.admitted),
        "admitted_per_second": round(len(tally.admitted) / result.elapsed, 1)
        if result.elapsed
        else 0.0,
        "admitted_latency_ms": {
            "p50": percentile_ms(tally.admitted, 0.5),
            "p99": percentile_ms(tally.admitted, 0.99),
        },
        "refused": refusals,
        "other_4xx": tally.other,
        "refused_latency_ms": {
            "p50": percentile_ms(tally.refused, 0.5),
            "p99": percentile_ms(tally.refused, 0.99),
        },
        "refusals_with_retry_after": round(tally.actionable / refusals, 4) if refusals else None,
        "client_timeouts": timeouts,
        "timeouts_detail": {
            "no_answer": result.connection_errors,
            "never_sent": schedule.abandoned,
            "answered_too_late": tally.late,
        },
        "client_cpu_seconds": round(result.client_cpu_seconds, 2),
    }
    return figures, tally.payments_seen
