"""Group commit: concurrent payment and refund requests share one write-store transaction.

A durable commit costs a disk flush whatever it holds, so a transaction per request caps the
command API at what the store can flush one after the other. With group commit on
(``KESSAI_GROUP_COMMIT``), a route hands its ``WriteCommand`` to the app's ``GroupCommitter``
and awaits its own answer. The committer gathers commands until ``KESSAI_GROUP_COMMIT_MAX_BATCH``
are waiting or the oldest has waited ``KESSAI_GROUP_COMMIT_MAX_DELAY_MS``, and records the
batch in one transaction (``commit_batch``), in a worker thread behind the database bulkhead:

1. one read of the idempotency records of every command in the batch, one read (by primary
   key) of the events of every payment being refunded;
2. each command decided in arrival order, in memory, exactly as it would be alone: a replay,
   ``422 idempotency_key_reused``, a new capture, a refund checked against the running fold
   of its payment (two refunds of one payment in a batch get versions n+1 and n+2, and the
   second is checked against what the first left), ``404`` or ``409 refund_exceeds_captured``;
   a refused command writes nothing, its key included;
3. the new events, their outbox rows and the idempotency records as multi-row INSERTs in
   primary-key order (two writers inserting overlapping keys in different orders deadlock on
   MariaDB); commit; every request gets its own answer.

If the batch fails as a whole (another process wrote the same payment version or idempotency
key first, a deadlock, a lost connection), no request fails with it: each is recorded alone
through the single-request path (``handlers.run_alone``, with its write-conflict retries) and
gets the answer it would have got without group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.engine import Engine

from command_service import handlers, repository
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.events import PaymentCaptured, PaymentRefunded
from kessai.ledger import PaymentState, apply, fold

log = logging.getLogger(__name__)

Result = handlers.Outcome | ApiError | None
"""A command's answer, its refusal, or ``None``: record it alone (the batch failed)."""

Hook = Callable[[sa.Connection], None]


def commit_batch(
    engine: Engine,
    commands: Sequence[handlers.WriteCommand],
    *,
    before_write: Hook | None = None,
) -> list[Result]:
    """Decide and record ``commands`` in one transaction; one result per command, in order.

    Raises if the transaction fails as a whole (nothing is then recorded). ``before_write``
    runs inside the transaction after the decisions and before the inserts (tests use it to
    play a concurrent writer)."""
    results: list[Result] = [None] * len(commands)
    scopes = [(c.policy.client_id, c.policy.idempotency_key) for c in commands]
    now = utcnow()
    with engine.begin() as conn:
        records = repository.get_idempotency_many(conn, set(scopes))
        refunded = {c.payment_id for c in commands if c.payment_id is not None}
        histories = repository.load_events_of_payments(conn, refunded)
        states: dict[uuid.UUID, PaymentState | None] = {
            payment_id: fold(histories.get(payment_id, [])) for payment_id in refunded
        }
        seen: set[tuple[str, str]] = set()
        expired: list[tuple[str, str]] = []
        new_events: list[PaymentCaptured | PaymentRefunded] = []
        new_records: list[dict[str, object]] = []
        for index, (command, scope) in enumerate(zip(commands, scopes, strict=True)):
            if scope in seen:
                # The same key twice in one batch (the in-flight guard makes it rare): the
                # later one is recorded alone once this batch has committed, and replays.
                continue
            seen.add(scope)
            record = records.get(scope)
            try:
                answer = handlers.recorded_answer(record, command, now)
                if answer is not None:
                    results[index] = answer
                    continue
                payment_id = command.payment_id
                status, body, events = command.decide(
                    None if payment_id is None else states[payment_id]
                )
            except ApiError as exc:
                results[index] = exc
                continue
            if payment_id is not None:
                state = states[payment_id]
                for event in events:
                    state = apply(state, event)
                states[payment_id] = state
            if record is not None:
                expired.append(scope)
            body_json = orjson.dumps(body).decode()
            new_events.extend(events)
            new_records.append(
                {
                    "client_id": scope[0],
                    "idempotency_key": scope[1],
                    "request": command.request_json,
                    "response_status": status,
                    "response_body": body_json,
                    "created_at": now,
                    "expires_at": now + command.policy.retention,
                }
            )
            results[index] = handlers.Outcome(status, body_json.encode(), False)
        if before_write is not None:
            before_write(conn)
        repository.delete_idempotency_many(conn, expired)
        new_events.sort(key=lambda e: (e.payment_id, e.version))
        if new_events:
            repository.append_events(conn, new_events, shards=commands[0].policy.shards)
        repository.save_idempotency_many(conn, new_records)
    return results


@dataclass(slots=True)
class _Pending:
    command: handlers.WriteCommand
    future: asyncio.Future[Result]
    enqueued_at: float


class GroupCommitter:
    """Gathers the write commands of concurrent requests and commits them in batches, one
    batch at a time; requests that arrive meanwhile form the next batch."""

    def __init__(
        self,
        *,
        engine: Engine,
        limiter: anyio.CapacityLimiter,
        max_batch: int,
        max_delay_seconds: float,
        registry: CollectorRegistry,
    ) -> None:
        self.engine = engine
        self.limiter = limiter
        self.max_batch = max_batch
        self.max_delay = max_delay_seconds
        self.before_write: Hook | None = None
        self._registry = registry
        self.batch_size = Histogram(
            "kessai_group_commit_batch_size",
            "Requests recorded per group-commit transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
            registry=registry,
        )
        self.fallbacks = Counter(
            "kessai_group_commit_fallbacks",
            "Group commits that failed as a whole; their requests were recorded one by one.",
            registry=registry,
        )
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kessai-group-commit")

    async def aclose(self) -> None:
        """Commit what is queued, then stop; later commands are recorded alone."""
        self._closed = True
        self._arrived.set()
        self._full.set()
        if self._task is not None:
            await self._task
        self._registry.unregister(self.batch_size)
        self._registry.unregister(self.fallbacks)

    async def submit(self, command: handlers.WriteCommand) -> handlers.Outcome | None:
        """The answer to ``command`` once its batch committed; raises its ``ApiError`` if it
        was refused; ``None`` if it must be recorded alone (its batch failed as a whole).

        The wait cannot be cancelled, like a handler in a worker thread: a request whose
        client went away keeps its in-flight claim until its batch is done."""
        if self._closed or self._task is None or self._task.done():
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append(_Pending(command, future, loop.time()))
        self._arrived.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()
        with anyio.CancelScope(shield=True):
            result = await future
        if isinstance(result, ApiError):
            raise result
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                wait = self._queue[0].enqueued_at + self.max_delay - loop.time()
                if len(self._queue) < self.max_batch and wait > 0 and not self._closed:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
                take = min(self.max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                await self._flush(batch)
        finally:
            # Whatever stopped the loop, no request waits forever: they are recorded alone.
            while self._queue:
                pending = self._queue.popleft()
                if not pending.future.done():
                    pending.future.set_result(None)

    async def _flush(self, batch: list[_Pending]) -> None:
        commands = [pending.command for pending in batch]
        hook = self.before_write
        results: list[Result]
        try:
            results = await anyio.to_thread.run_sync(
                lambda: commit_batch(self.engine, commands, before_write=hook),
                limiter=self.limiter,
            )
        except Exception as exc:  # every request is then recorded alone
            log.info(
                "group commit of %d requests failed (%s); recording them one by one",
                len(batch),
                type(exc).__name__,
            )
            self.fallbacks.inc()
            results = [None] * len(batch)
        else:
            self.batch_size.observe(len(batch))
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
