"""Load shedding: each API process bounds the work it holds, and refuses the rest at once.

Without a bound, a surge queues: every request waits behind all the others, latencies grow
past every client's time-out, and payments get committed whose ``201`` nobody sees (an
open-loop 2,500/s against the command API gave a median of 21.6 s). Here each process lets at
most ``max_in_flight`` requests into the app; a request beyond that waits in a short FIFO
queue, at most ``max_queue_wait`` and behind at most ``max_in_flight`` others, and is then
answered ``503 overloaded`` with ``Retry-After``. The refusal happens before the body is read,
before any rate-limit counter, key or database lookup: it costs the process almost nothing,
so it stays fast however hard the flood.

Some requests are worth more than others. On the command API, refunds and the payments of
devices that were served recently (a bounded set of ``X-Device-Id`` answered 2xx) may use
every slot; other requests only ``max_in_flight - reserved``, so new devices are shed first
and users already in a payment flow finish it.

Probes and ``/metrics`` are never shed: an orchestrator must see a busy process as alive.

Why not a library: ``asyncio.Semaphore`` or ``anyio.CapacityLimiter`` with a time-out would
bound the work, but neither has a share only some requests may use, nor a bound on how many
wait; the gate below is those two things and nothing else.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kessai.errors import error_body

NEVER_SHED = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_SECONDS = 1
_REFUND_PATH = re.compile(r"^/v1/payments/[^/]+/refunds$")


class Gate:
    """At most ``limit`` holders; ``reserved`` of the slots only for preferred requests; a
    FIFO queue of at most ``max_waiting`` for each kind (a flood of new requests cannot fill
    the queue of the preferred ones), preferred ones served first. Single event loop, no
    locks: every method runs on the loop without awaiting between check and update."""

    def __init__(self, *, limit: int, reserved: int, max_waiting: int) -> None:
        self.limit = limit
        self.general_limit = max(1, limit - reserved)
        self.max_waiting = max_waiting
        self.in_flight = 0
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    def _fits(self, preferred: bool) -> bool:
        return self.in_flight < (self.limit if preferred else self.general_limit)

    @property
    def waiting(self) -> int:
        return len(self._waiting[True]) + len(self._waiting[False])

    def try_enter(self, preferred: bool) -> bool:
        if self._fits(preferred) and not self._waiting[preferred]:
            self.in_flight += 1
            return True
        return False

    async def enter(self, preferred: bool, max_wait: float) -> str | None:
        """Wait for a slot at most ``max_wait`` seconds; None once in, else why not."""
        if self.try_enter(preferred):
            return None
        queue = self._waiting[preferred]
        if len(queue) >= self.max_waiting or max_wait <= 0:
            return "queue_full"
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(slot)
        try:
            async with asyncio.timeout(max_wait):
                await slot
        except TimeoutError:
            if slot.done() and not slot.cancelled():
                return None  # handed a slot as the time ran out: it is ours
            if slot in queue:
                queue.remove(slot)
            return "queue_timeout"
        except BaseException:
            if slot.done() and not slot.cancelled():
                self.leave()
            elif slot in queue:
                queue.remove(slot)
            raise
        return None

    def leave(self) -> None:
        self.in_flight -= 1
        for preferred in (True, False):
            queue = self._waiting[preferred]
            while queue and self._fits(preferred):
                slot = queue.popleft()
                if slot.done():  # its waiter timed out or was cancelled meanwhile
                    continue
                self.in_flight += 1  # handed over here, so no newcomer can take it meanwhile
                slot.set_result(None)


class RecentDevices:
    """Devices answered 2xx in the last ``seconds``, at most ``size`` of them (the oldest go
    first). A ``cachetools.TTLCache``: bounded in memory whatever a flood of ids does."""

    def __init__(self, size: int, seconds: float) -> None:
        self._seen: TTLCache[bytes, None] = TTLCache(maxsize=size, ttl=seconds)

    def add(self, device_id: bytes) -> None:
        self._seen[device_id] = None

    def __contains__(self, device_id: bytes) -> bool:
        return device_id in self._seen


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


@dataclass(slots=True)
class Preference:
    """Which requests of the command API may use the reserved share: refunds, and payments of
    devices recently served."""

    recent: RecentDevices

    def preferred(self, scope: Scope) -> tuple[bool, bytes | None]:
        """(preferred?, the device id to remember if the answer is a success)."""
        if scope["method"] == "POST" and _REFUND_PATH.match(scope["path"]):
            return True, None
        device = _header(scope, b"x-device-id")
        if device is None:
            return False, None
        return device in self.recent, device


class LoadShedder:
    """One process's gate and what it counts; ``ShedLoad`` (the ASGI middleware) puts it
    around everything inside it (rate limits, key check, routes).

    ``observers`` are told the queue delay of every request but the preferred ones (seconds;
    a refused one counts the whole wait bound): adaptive admission control listens here.
    """

    def __init__(
        self,
        *,
        max_in_flight: int,
        reserved: int,
        max_queue_wait: float,
        registry: CollectorRegistry,
        service: str,
        preference: Preference | None = None,
    ) -> None:
        self.gate = Gate(
            limit=max_in_flight,
            reserved=reserved if preference is not None else 0,
            max_waiting=max_in_flight,
        )
        self.max_queue_wait = max_queue_wait
        self.preference = preference
        self.observers: list[Callable[[float], None]] = []
        self.shed = Counter(
            "kessai_overload_shed_total",
            "Requests refused with 503 overloaded, by reason (queue_full, queue_timeout) and "
            "whether they were preferred (refunds, recently served devices).",
            ["service", "reason", "preferred"],
            registry=registry,
        )
        in_flight = Gauge(
            "kessai_overload_in_flight",
            "Requests holding a slot of the load shedder now.",
            ["service"],
            registry=registry,
        )
        in_flight.labels(service).set_function(lambda: self.gate.in_flight)
        waiting = Gauge(
            "kessai_overload_waiting",
            "Requests waiting for a slot of the load shedder now.",
            ["service"],
            registry=registry,
        )
        waiting.labels(service).set_function(lambda: self.gate.waiting)
        self.service = service
        self._bodies = {
            reason: error_body(
                "overloaded",
                f"The service is overloaded; retry after {RETRY_AFTER_SECONDS} s.",
                {"retry_after_seconds": RETRY_AFTER_SECONDS, "reason": reason},
            )
            for reason in ("queue_full", "queue_timeout")
        }

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for this request once it holds a slot, or refuse it."""
        preferred, device = self.preference.preferred(scope) if self.preference else (False, None)
        asked = time.perf_counter()
        refused = await self.gate.enter(preferred, self.max_queue_wait)
        if not preferred:  # the delay new requests see: what adaptive admission steers by
            delay = self.max_queue_wait if refused else time.perf_counter() - asked
            for observe in self.observers:
                observe(delay)
        if refused is not None:
            self.shed.labels(self.service, refused, str(preferred).lower()).inc()
            await self._refuse(send, refused)
            return
        try:
            if device is None or self.preference is None:
                await app(scope, receive, send)
                return
            recent = self.preference.recent

            async def remember(message: Message) -> None:
                if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                    recent.add(device)
                await send(message)

            await app(scope, receive, remember)
        finally:
            self.gate.leave()

    async def _refuse(self, send: Send, reason: str) -> None:
        # The connection stays open: closing it would make every refused client pay a new
        # TCP handshake, more work for a process that is already short of it.
        body = self._bodies[reason]
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ShedLoad:
    """ASGI middleware: every HTTP request but probes and metrics goes through ``shedder``."""

    def __init__(self, app: ASGIApp, *, shedder: LoadShedder) -> None:
        self.app = app
        self.shedder = shedder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NEVER_SHED:
            await self.app(scope, receive, send)
            return
        await self.shedder(self.app, scope, receive, send)


def reserved_slots(max_in_flight: int, reserved_percent: float) -> int:
    """Slots only preferred requests may use; always at least one left for the others."""
    return min(max_in_flight - 1, math.ceil(max_in_flight * reserved_percent / 100))
