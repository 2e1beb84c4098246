"""The write path after the route: decide each write command, and record it in one transaction.

A route builds a ``WriteCommand`` (``command_service/commands.py``; ``capture_command`` and
``decline_command`` in ``routes/payments.py``, ``refund_command`` in ``routes/refunds.py``,
``top_up_command`` in ``routes/top_ups.py``, ``registration_command`` in ``routes/users.py``,
the campaign commands in ``routes/campaigns.py``): the normalized request and a pure ``decide``
step, given the state of the payment and of the wallet it touches (a registration is checked
against the users registered before ``decide``: ``registers``; a campaign's command is given
its campaign instead: ``decide_campaign``). It hands the command to ``Recorder.record``, which
gathers the commands of concurrent requests into batches (group commit, with
``command_service/batching.py``), or records one alone (``record_alone``: a batch of one, run
again from the top on a write conflict) when group commit is off or its batch failed as a
whole.

This module owns the transaction; its SQL is in ``command_service/store.py`` and
``kessai/write_store.py``, and what a command is lives in ``command_service/commands.py``
(re-exported here). ``commit_batch`` is the only transaction script of the write path: every
payment, refund, top-up, registration and campaign change is recorded there (events of
payments, of wallets, registrations and campaigns, outbox rows and idempotency records, all or
nothing; ``engine.begin()``), and nothing else in the command API begins or commits one. A
refused command writes nothing, its key included.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
import tenacity
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service.batching import GroupCommitter
from command_service.commands import (
    CampaignNow,
    Clock,
    Decide,
    DecideCampaign,
    Decision,
    IdSource,
    Outcome,
    Result,
    WriteCommand,
    WritePolicy,
    campaign_command,
    canonical,
    no_wallet,
)
from command_service.store import (
    Event,
    IdempotencyRecord,
    PaymentEvent,
    Scope,
    append_events,
    delete_idempotency_many,
    get_idempotency,
    get_idempotency_many,
    is_write_conflict,
    load_events_of_payments,
    load_registrations,
    load_wallets,
    save_idempotency_many,
)
from kessai.campaigns import AnyCampaignEvent
from kessai.clock import utcnow
from kessai.errors import ApiError
from kessai.events import PaymentCaptured, PaymentRefunded, UserRegistered
from kessai.ids import new_id
from kessai.ledger import PaymentState, apply, fold
from kessai.settings import Settings
from kessai.wallets import Wallet, apply_movement, movement_of
from kessai.write_store import load_campaigns, load_granted

__all__ = [
    "CampaignNow",
    "Clock",
    "Decide",
    "DecideCampaign",
    "Decision",
    "Event",
    "IdSource",
    "Outcome",
    "Result",
    "WriteCommand",
    "WritePolicy",
    "append_events",
    "campaign_command",
    "canonical",
    "is_write_conflict",
    "load_events_of_payments",
    "no_wallet",
]
Hook = Callable[[sa.Connection], None]
_T = TypeVar("_T")


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


def payment_states(
    commands: Sequence[WriteCommand], histories: Mapping[uuid.UUID, list[PaymentEvent]]
) -> dict[uuid.UUID, PaymentState | None]:
    """The folded state of every payment ``commands`` refund."""
    return {
        payment_id: fold(histories.get(payment_id, []))
        for payment_id in {c.payment_id for c in commands if c.payment_id is not None}
    }


def wallets_touched(
    commands: Sequence[WriteCommand], states: Mapping[uuid.UUID, PaymentState | None]
) -> set[str]:
    return {
        user_id
        for c in commands
        if (user_id := c.wallet_of(None if c.payment_id is None else states[c.payment_id]))
    }


def user_exists(user_id: str, registered_at: datetime) -> ApiError:
    """The refusal of a second registration of a user (another Idempotency-Key, or another
    client): when the first one was, in ``details``."""
    return ApiError(
        409,
        "user_exists",
        f"User {user_id} is registered already.",
        {"user_id": user_id, "registered_at": _iso(registered_at)},
    )


def _iso(moment: datetime) -> str:
    """As the answers' bodies write an instant (``2026-12-03T08:51:00.152835Z``)."""
    return orjson.dumps(moment, option=orjson.OPT_UTC_Z).decode().strip('"')


def _registered_first(command: WriteCommand, registered: Mapping[str, datetime]) -> None:
    """``409 user_exists`` if ``command`` registers a user who is registered already."""
    user_id = command.registers
    if user_id is not None and (registered_at := registered.get(user_id)) is not None:
        raise user_exists(user_id, registered_at)


def decide_batch(
    commands: Sequence[WriteCommand],
    records: Mapping[Scope, IdempotencyRecord],
    states: dict[uuid.UUID, PaymentState | None],
    wallets: dict[str, Wallet],
    *,
    registered: dict[str, datetime],
    campaigns: dict[str, CampaignNow] | None = None,
    now: datetime,
    clock: Clock,
    ids: IdSource,
) -> BatchDecision:
    """Decide ``commands`` in order, in memory, each exactly as it would be alone: a replay,
    ``422 idempotency_key_reused``, a capture, a top-up, a refund or a registration, each
    checked against the running fold of its payment and the running balance of its wallet (two
    refunds of one payment get versions n+1 and n+2, two payments from one wallet its versions
    m+1 and m+2, and the second is checked against what the first left), a registration
    against the users registered (``registered``: user -> when; two registrations of one user
    in a batch: the first wins, the second is ``409 user_exists``), a campaign's command
    against its campaign (``campaigns``: two changes of one campaign get versions n+1 and
    n+2). ``states``, ``wallets``, ``registered`` and ``campaigns`` are advanced in place. New
    events come out in (stream, version) order."""
    campaigns = {} if campaigns is None else campaigns
    decided = BatchDecision(results=[None] * len(commands))
    seen: set[Scope] = set()
    for index, command in enumerate(commands):
        scope = command.scope
        if scope in seen:  # rare: the in-flight guard refuses most of these at once
            continue
        seen.add(scope)
        record = records.get(scope)
        state = None if command.payment_id is None else states[command.payment_id]
        user_id = command.wallet_of(state)
        try:
            replayed = recorded_answer(record, command, now)
            if replayed is not None:
                decided.results[index] = replayed
                continue
            _registered_first(command, registered)
            if command.decide_campaign is not None and command.campaign_id is not None:
                campaign = campaigns[command.campaign_id]
                status, body, events = command.decide_campaign(campaign, clock=clock, ids=ids)
            else:
                wallet = None if user_id is None else wallets[user_id]
                status, body, events = command.decide(state, wallet, clock=clock, ids=ids)
        except ApiError as exc:
            decided.results[index] = exc
            continue
        for event in events:
            if isinstance(event, PaymentCaptured | PaymentRefunded):
                state = apply(state, event)
                states[event.payment_id] = state
            elif isinstance(event, UserRegistered):
                registered[event.user_id] = event.recorded_at
            elif isinstance(event, AnyCampaignEvent):
                campaigns[event.campaign_id] = campaigns[event.campaign_id].after(event)
            else:
                wallets[event.user_id] = apply_movement(wallets[event.user_id], movement_of(event))
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
    return decided


def campaigns_named(
    conn: sa.Connection, commands: Sequence[WriteCommand]
) -> dict[str, CampaignNow]:
    """The campaign of every campaign's command in ``commands``: its events folded and what it
    has granted, in one read each; no read at all for a batch without one (payments)."""
    named = {c.campaign_id for c in commands if c.campaign_id is not None}
    if not named:
        return {}
    states = load_campaigns(conn, named)
    granted = load_granted(conn, named)
    return {
        campaign_id: CampaignNow(campaign_id, states.get(campaign_id), granted[campaign_id].amount)
        for campaign_id in named
    }


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
       of every payment being refunded, one read of the newest movement of every wallet the
       commands touch (a balance payment's, a top-up's, a refund of a balance payment's), one
       primary-key read of the registrations of the users the commands register, and of the
       campaigns the commands change (their events, and what they granted), if any do;
    2. ``decide_batch``;
    3. the new events, their outbox rows and the idempotency records as multi-row INSERTs in
       primary-key order (two writers inserting overlapping keys in different orders deadlock on
       MariaDB); commit.

    Raises if the transaction fails as a whole: nothing is then recorded (a payment's or a
    wallet's version, or a key, that another transaction committed meanwhile is
    ``is_write_conflict``).
    ``before_write`` runs inside the transaction after the decisions and before the inserts
    (tests use it to play a concurrent writer)."""
    with engine.begin() as conn:
        return record_batch(conn, commands, before_write=before_write, clock=clock, ids=ids)


def record_batch(
    conn: sa.Connection,
    commands: Sequence[WriteCommand],
    *,
    before_write: Hook | None = None,
    clock: Clock = utcnow,
    ids: IdSource = new_id,
) -> list[Result | None]:
    """Steps 1-3 of ``commit_batch`` inside the transaction ``conn`` is in (its caller's to
    commit: ``commit_batch``, or a test playing another process)."""
    now = clock()
    records = get_idempotency_many(conn, {c.scope for c in commands})
    refunded = {c.payment_id for c in commands if c.payment_id is not None}
    states = payment_states(commands, load_events_of_payments(conn, refunded))
    wallets = load_wallets(conn, wallets_touched(commands, states))
    registered = load_registrations(conn, {c.registers for c in commands if c.registers})
    decided = decide_batch(
        commands,
        records,
        states,
        wallets,
        registered=registered,
        campaigns=campaigns_named(conn, commands),
        now=now,
        clock=clock,
        ids=ids,
    )
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
            "The payment or wallet changed concurrently too many times; retry the request.",
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
        self.group_attempts = 1
        self.before_write: Hook | None = None
        """Passed to ``commit_batch`` for group commits (tests play a concurrent writer)."""
        self._wallet_writers: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        """Per wallet, the lock its commands recorded alone take in turn (while any holds it)."""

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
        recorder.group_attempts = settings.group_commit_attempts
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
        """The batch, decided again as a whole while it loses races to another process (two
        processes' batches paying from one wallet collide on its next version: one of them
        must read the other's commit and decide again); after ``group_commit_attempts``, the
        last failure is raised and its requests are recorded one by one."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_write_conflict),
            stop=tenacity.stop_after_attempt(self.group_attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.001, max=0.01),
            before_sleep=self._count_retry,
            reraise=True,
        )
        return retrying(commit_batch, self.engine, commands, before_write=self.before_write)

    def _count_retry(self, _state: tenacity.RetryCallState) -> None:
        if self.committer is not None:
            self.committer.retries.inc()

    async def record(self, command: WriteCommand) -> Outcome:
        """Record ``command`` with those of concurrent requests (group commit), or alone when
        group commit is off or its batch failed as a whole."""
        if self.committer is not None:
            result = await self.committer.submit(command)
            if isinstance(result, ApiError):
                raise result
            if result is not None:
                return result
        # Commands of one wallet recorded alone take turns within this process: racing each
        # other for the wallet's next version, 200 payments from one wallet at once would run
        # out of attempts (409) where a batch decides them all. Other processes still race, and
        # so do refunds (their wallet is known only once their payment is read).
        user_id = command.wallet_of(None)
        if user_id is None:
            return await in_worker(self.limiter, lambda: record_alone(self.engine, command))
        lock = self._wallet_writers.get(user_id)
        if lock is None:
            lock = self._wallet_writers[user_id] = asyncio.Lock()
        async with lock:
            return await in_worker(self.limiter, lambda: record_alone(self.engine, command))
