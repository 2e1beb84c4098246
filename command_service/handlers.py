"""The write path after the route: decide each write command, and record it in one transaction.

A route builds a ``WriteCommand`` (``capture_command`` and ``decline_command`` in
``routes/payments.py``, ``refund_command`` in ``routes/refunds.py``): the normalized request
and a pure ``decide`` step. It hands the command to ``Recorder.record``, which gathers the
commands of concurrent requests into batches (group commit, with
``command_service/batching.py``), or records one alone (``record_alone``: a batch of one, run
again from the top on a write conflict) when group commit is off or its batch failed as a
whole.

This module owns the transaction and holds its SQL (at the end). ``commit_batch`` is the only
transaction script of the write path: every payment and refund is recorded there (events,
outbox rows and idempotency records, all or nothing; ``engine.begin()``), and nothing else in
the command API begins or commits one. A refused command writes nothing, its key included.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
import tenacity
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service.batching import GroupCommitter
from command_service.outbox import shard_of
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.events import PaymentCaptured, PaymentRefunded, event_to_json, parse_event
from kessai.ids import new_id
from kessai.ledger import PaymentState, apply, fold
from kessai.schema.write import events, idempotency_keys, outbox
from kessai.settings import Settings

Event = PaymentCaptured | PaymentRefunded
Scope = tuple[str, str]
"""(API key id, Idempotency-Key): idempotency keys are scoped per API client."""
Clock = Callable[[], datetime]
IdSource = Callable[[], uuid.UUID]
Hook = Callable[[sa.Connection], None]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class WritePolicy:
    client_id: str
    idempotency_key: str
    retention: timedelta
    shards: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes
    replayed: bool


Result = Outcome | ApiError
"""A command's answer (new or replayed), or its refusal."""

Decision = tuple[int, dict[str, Any], list[Event]]
"""The answer to a request (status, body) and the events it appends."""


class Decide(Protocol):
    def __call__(self, state: PaymentState | None, /, *, clock: Clock, ids: IdSource) -> Decision:
        """The answer to the command given its payment's folded state, or ``ApiError``."""
        ...


@dataclass(frozen=True, slots=True)
class WriteCommand:
    """One write request, ready to be decided against the state of the payment it touches.

    ``decide`` touches no database and reads the time and new ids only from ``clock`` and
    ``ids``: given the folded state of ``payment_id`` (``None`` for a new payment, or a refund
    of a payment that does not exist), it returns the answer and the events to append, or
    raises ``ApiError`` for a refusal."""

    policy: WritePolicy
    request: dict[str, Any]
    request_json: str
    payment_id: uuid.UUID | None
    decide: Decide

    @property
    def scope(self) -> Scope:
        return (self.policy.client_id, self.policy.idempotency_key)


def canonical(request: dict[str, Any]) -> str:
    """The normalized request as stored with its idempotency record and compared on reuse."""
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS).decode()


# -- replays -----------------------------------------------------------------------------------


def recorded_answer(
    record: IdempotencyRecord | None, command: WriteCommand, now: datetime
) -> Outcome | None:
    """The replay check, the only one: the stored answer that a live record under the
    command's key gives it, or ``None`` without one (or once it expired); a record of another
    request is ``422 idempotency_key_reused``, naming the fields that differ."""
    if record is None or record.expires_at <= now:
        return None
    if record.request == command.request_json:
        return Outcome(record.response_status, record.response_body.encode(), True)
    original: dict[str, Any] = orjson.loads(record.request)
    fields = sorted(
        k
        for k in original.keys() | command.request.keys()
        if original.get(k) != command.request.get(k)
    )
    raise ApiError(
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used for a different request: " + ", ".join(fields) + " differ.",
        {"fields": fields},
    )


def stored_answer(*, engine: Engine, command: WriteCommand) -> Outcome | None:
    """The recorded answer to ``command`` under its idempotency key, if any (``recorded_answer``).

    Read before a card payment calls the acquirer, in a short read of its own (no transaction
    is held across the call): a completed request is replayed without a second authorization.
    ``None``: not answered yet (or expired); ``commit_batch`` checks again when it records."""
    with engine.connect() as conn:
        record = get_idempotency(conn, *command.scope)
    return recorded_answer(record, command, utcnow())


# -- the transaction ---------------------------------------------------------------------------


@dataclass(slots=True)
class BatchDecision:
    """What a batch of commands answers and writes."""

    results: list[Result | None]
    """Per command, in order; ``None``: a second command with the same key in the batch, to be
    recorded alone once the batch has committed (it then replays the first one's answer)."""
    expired: list[Scope] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    records: list[dict[str, object]] = field(default_factory=list)


def decide_batch(
    commands: Sequence[WriteCommand],
    records: Mapping[Scope, IdempotencyRecord],
    histories: Mapping[uuid.UUID, list[Event]],
    *,
    now: datetime,
    clock: Clock,
    ids: IdSource,
) -> BatchDecision:
    """Decide ``commands`` in order, in memory, each exactly as it would be alone: a replay,
    ``422 idempotency_key_reused``, a capture, or a refund checked against the running fold of
    its payment (two refunds of one payment get versions n+1 and n+2, and the second is checked
    against what the first left). New events come out in (payment, version) order."""
    states = {
        payment_id: fold(histories.get(payment_id, []))
        for payment_id in {c.payment_id for c in commands if c.payment_id is not None}
    }
    decided = BatchDecision(results=[None] * len(commands))
    seen: set[Scope] = set()
    for index, command in enumerate(commands):
        scope = command.scope
        if scope in seen:  # rare: the in-flight guard refuses most of these at once
            continue
        seen.add(scope)
        record = records.get(scope)
        state = None if command.payment_id is None else states[command.payment_id]
        try:
            replayed = recorded_answer(record, command, now)
            if replayed is not None:
                decided.results[index] = replayed
                continue
            status, body, events = command.decide(state, clock=clock, ids=ids)
        except ApiError as exc:
            decided.results[index] = exc
            continue
        if command.payment_id is not None:
            for event in events:
                state = apply(state, event)
            states[command.payment_id] = state
        if record is not None:
            decided.expired.append(scope)
        body_json = orjson.dumps(body).decode()
        decided.events.extend(events)
        decided.records.append(
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
        decided.results[index] = Outcome(status, body_json.encode(), False)
    decided.events.sort(key=lambda e: (e.payment_id, e.version))
    return decided


def commit_batch(
    engine: Engine,
    commands: Sequence[WriteCommand],
    *,
    before_write: Hook | None = None,
    clock: Clock = utcnow,
    ids: IdSource = new_id,
) -> list[Result | None]:
    """Decide and record ``commands`` in one transaction, begun and committed here; one
    result per command, in order (see ``BatchDecision.results``).

    1. one read of the idempotency records of every command, one primary-key read of the events
       of every payment being refunded;
    2. ``decide_batch``;
    3. the new events, their outbox rows and the idempotency records as multi-row INSERTs in
       primary-key order (two writers inserting overlapping keys in different orders deadlock on
       MariaDB); commit.

    Raises if the transaction fails as a whole: nothing is then recorded (a version or key that
    another transaction committed meanwhile is ``is_write_conflict``).
    ``before_write`` runs inside the transaction after the decisions and before the inserts
    (tests use it to play a concurrent writer)."""
    now = clock()
    with engine.begin() as conn:
        records = get_idempotency_many(conn, {c.scope for c in commands})
        refunded = {c.payment_id for c in commands if c.payment_id is not None}
        histories = load_events_of_payments(conn, refunded)
        decided = decide_batch(commands, records, histories, now=now, clock=clock, ids=ids)
        if before_write is not None:
            before_write(conn)
        delete_idempotency_many(conn, decided.expired)
        append_events(conn, decided.events, shards=commands[0].policy.shards)
        save_idempotency_many(conn, decided.records)
    return decided.results


def record_alone(engine: Engine, command: WriteCommand) -> Outcome:
    """Record ``command`` as a batch of one, run again from the top on a write conflict (a
    concurrent refund took the next version; another process recorded the same key first; a
    deadlock), so that the next attempt sees the winner's commit. Raises the command's
    ``ApiError``, or ``409 concurrent_modification`` after ``max_attempts`` conflicts."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_write_conflict),
        stop=tenacity.stop_after_attempt(command.policy.max_attempts),
        wait=tenacity.wait_random_exponential(multiplier=0.002, max=0.05),
    )
    try:
        (result,) = retrying(commit_batch, engine, [command])
    except tenacity.RetryError as exc:
        raise ApiError(
            409,
            "concurrent_modification",
            "The payment changed concurrently too many times; retry the request.",
            {"attempts": command.policy.max_attempts},
        ) from exc
    if isinstance(result, Outcome):
        return result
    raise result or RuntimeError("a batch of one left its command unanswered")


# -- recording ---------------------------------------------------------------------------------


async def in_worker(limiter: anyio.CapacityLimiter, call: Callable[[], _T]) -> _T:
    """``call`` in a worker thread behind the database bulkhead; an unreachable store is 503."""
    try:
        return await anyio.to_thread.run_sync(call, limiter=limiter)
    except sa.exc.OperationalError as exc:
        raise ApiError(
            503,
            "write_store_unavailable",
            "The write store is unavailable; retry later.",
            headers={"Retry-After": "1"},
        ) from exc


class Recorder:
    """Where the routes hand their write commands: ``record`` returns the answer or raises the
    refusal. Database work runs in worker threads behind ``limiter`` (the bulkhead)."""

    def __init__(self, *, engine: Engine, limiter: anyio.CapacityLimiter) -> None:
        self.engine = engine
        self.limiter = limiter
        self.committer: GroupCommitter[WriteCommand, Result] | None = None
        self.before_write: Hook | None = None
        """Passed to ``commit_batch`` for group commits (tests play a concurrent writer)."""

    @classmethod
    def start(
        cls,
        settings: Settings,
        engine: Engine,
        limiter: anyio.CapacityLimiter,
        registry: CollectorRegistry,
    ) -> Recorder:
        """A recorder; with ``KESSAI_GROUP_COMMIT`` on, with its group committer running."""
        recorder = cls(engine=engine, limiter=limiter)
        if settings.group_commit:
            recorder.committer = GroupCommitter(
                commit=recorder._commit_group,
                limiter=limiter,
                max_batch=settings.group_commit_max_batch,
                max_delay_seconds=settings.group_commit_max_delay_ms / 1000,
                registry=registry,
            )
            recorder.committer.start()
        return recorder

    async def aclose(self) -> None:
        """Commit what is queued; later commands are recorded alone."""
        if self.committer is not None:
            await self.committer.aclose()

    def _commit_group(self, commands: Sequence[WriteCommand]) -> list[Result | None]:
        return commit_batch(self.engine, commands, before_write=self.before_write)

    async def record(self, command: WriteCommand) -> Outcome:
        """Record ``command`` with those of concurrent requests (group commit), or alone when
        group commit is off or its batch failed as a whole."""
        if self.committer is not None:
            result = await self.committer.submit(command)
            if isinstance(result, ApiError):
                raise result
            if result is not None:
                return result
        return await in_worker(self.limiter, lambda: record_alone(self.engine, command))


# -- the SQL of the write store: nothing here begins or commits -------------------------------

_MYSQL_RETRYABLE = {1205, 1213}  # lock wait timeout, deadlock


def is_write_conflict(exc: BaseException) -> bool:
    """A failure that another transaction caused and a fresh attempt can resolve."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        orig = exc.orig
        code = orig.args[0] if orig is not None and orig.args else None
        return code in _MYSQL_RETRYABLE or "database is locked" in str(orig)
    return False


def load_events_of_payments(
    conn: sa.Connection, payment_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, list[Event]]:
    """The events of several payments, each in version order, in one primary-key read."""
    found: dict[uuid.UUID, list[Event]] = {}
    if not payment_ids:
        return found
    rows = conn.execute(
        sa.select(events.c.payment_id, events.c.body)
        .where(events.c.payment_id.in_(sorted(payment_ids)))
        .order_by(events.c.payment_id, events.c.version)
    )
    for payment_id, body in rows:
        found.setdefault(payment_id, []).append(parse_event(body))
    return found


def append_events(conn: sa.Connection, new_events: Sequence[Event], *, shards: int) -> None:
    """Append events and their outbox rows. A duplicate (payment_id, version) raises
    ``IntegrityError``: that is the optimistic-concurrency check."""
    if not new_events:  # a recorded answer without events (a declined card payment)
        return
    event_rows = []
    outbox_rows = []
    for event in new_events:
        row = {
            "payment_id": event.payment_id,
            "version": event.version,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "body": event_to_json(event).decode(),
        }
        event_rows.append(
            {
                **row,
                "merchant_id": event.merchant_id,
                "amount": event.payload.amount,
                "currency": event.payload.currency,
                "occurred_at": event.occurred_at,
                "recorded_at": event.recorded_at,
            }
        )
        outbox_rows.append(
            {
                **row,
                "shard": shard_of(event.payment_id, shards),
                "created_at": event.recorded_at,
            }
        )
    conn.execute(events.insert(), event_rows)
    conn.execute(outbox.insert(), outbox_rows)


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    request: str
    response_status: int
    response_body: str
    expires_at: datetime


_RECORD_COLUMNS = (
    idempotency_keys.c.request,
    idempotency_keys.c.response_status,
    idempotency_keys.c.response_body,
    idempotency_keys.c.expires_at,
)


def _scope_in(scopes: Collection[Scope]) -> sa.ColumnElement[bool]:
    """(client_id, idempotency_key) among ``scopes``, in primary-key order."""
    return sa.tuple_(idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key).in_(
        sorted(scopes)
    )


def get_idempotency(conn: sa.Connection, client_id: str, key: str) -> IdempotencyRecord | None:
    row = conn.execute(
        sa.select(*_RECORD_COLUMNS).where(
            idempotency_keys.c.client_id == client_id,
            idempotency_keys.c.idempotency_key == key,
        )
    ).first()
    return None if row is None else IdempotencyRecord(*row)


def get_idempotency_many(
    conn: sa.Connection, scopes: Collection[Scope]
) -> dict[Scope, IdempotencyRecord]:
    """The records of several (client_id, idempotency_key) pairs, in one primary-key read."""
    if not scopes:
        return {}
    rows = conn.execute(
        sa.select(
            idempotency_keys.c.client_id, idempotency_keys.c.idempotency_key, *_RECORD_COLUMNS
        ).where(_scope_in(scopes))
    )
    return {(row[0], row[1]): IdempotencyRecord(*row[2:]) for row in rows}


def delete_idempotency_many(conn: sa.Connection, scopes: Collection[Scope]) -> None:
    if scopes:
        conn.execute(idempotency_keys.delete().where(_scope_in(scopes)))


def save_idempotency_many(conn: sa.Connection, records: Sequence[dict[str, Any]]) -> None:
    """Insert idempotency records (rows of ``idempotency_keys``) in one multi-row INSERT, in
    primary-key order. A key that another transaction holds raises ``IntegrityError``."""
    if records:
        conn.execute(
            idempotency_keys.insert(),
            sorted(records, key=lambda r: (r["client_id"], r["idempotency_key"])),
        )
