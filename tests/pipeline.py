"""Helpers for tests of the whole pipeline: write store -> relay -> broker -> projector -> read DB.

The central check is ``assert_read_side_matches``: the read database equals the fold of the
write store, payment by payment, and every merchant's daily and hourly totals equal the sums
of the events they count. ``assert_wallets_match`` does the same for the wallets' streams.

An event belongs to a stream: its payment (keyed by the payment id) or its user's wallet (keyed
by ``wallet_stream_id``); the relay publishes both on one topic. ``stored_stream_events`` and
``assert_streams_delivered_in_order`` check delivery by stream, whichever kind it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.payments import capture_command
from command_service.routes.refunds import refund_command
from command_service.schemas import CreatePayment, CreateRefund
from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    kafka_key,
    parse_any_event,
    parse_event,
    parse_wallet_event,
    stream_of,
    wallet_stream_id,
)
from kessai.ledger import PaymentState, fold
from kessai.schema.read import (
    merchant_daily_totals,
    merchant_hourly_totals,
    payments,
    wallet_movements,
    wallets,
)
from kessai.schema.write import events, wallet_events
from kessai.wallets import fold_wallet, movement_of
from tests.helpers import fund
from tests.wallet_streams import AnyEvent, WalletEvent, record_parts

TOKYO = ZoneInfo("Asia/Tokyo")
Event = PaymentCaptured | PaymentRefunded


class Runnable(Protocol):
    def run(self, stop: asyncio.Event | None = None) -> Awaitable[None]: ...


@contextlib.asynccontextmanager
async def running(*components: Runnable) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run components (relays, projectors) as tasks; stop them cleanly on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in components]
    try:
        yield tasks
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


async def wait_until(
    check: Callable[[], bool], *, within: float = 60.0, tasks: Sequence[asyncio.Task[None]] = ()
) -> None:
    """Poll ``check`` (run in a thread: it may query a database) until true, or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await asyncio.to_thread(check):
        for task in tasks:
            if task.done():
                task.result()
                raise AssertionError("a component stopped before the condition was met")
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.1)


@dataclass
class Traffic:
    payment_ids: list[uuid.UUID]
    events: int


def make_traffic(
    engine: Engine,
    *,
    payments_count: int,
    refund_share: float = 0.3,
    second_refund_share: float = 0.0,
    merchants: int = 5,
    seed: int = 7,
) -> Traffic:
    """Payments and refunds through the real command handlers, with a skewed merchant mix:
    merchant m0 takes a third of the traffic; the payers' wallets (u0-u49) are funded first.
    ``Traffic.events`` counts the payments' events, not the wallets'. A refunded payment gets
    a second refund (a version 3) with probability ``second_refund_share``."""
    rng = random.Random(seed)

    def policy(key: str) -> handlers.WritePolicy:
        return handlers.WritePolicy(
            client_id="test",
            idempotency_key=key,
            retention=timedelta(hours=1),
            shards=8,
            max_attempts=30,
        )

    fund(engine, *(f"u{n}" for n in range(50)))
    ids: list[uuid.UUID] = []
    count = 0
    for i in range(payments_count):
        merchant = "m0" if rng.random() < 1 / 3 else f"m{rng.randrange(1, merchants)}"
        outcome = handlers.record_alone(
            engine,
            capture_command(
                policy=policy(f"p-{seed}-{i}"),
                command=CreatePayment(
                    merchant_id=merchant,
                    user_id=f"u{rng.randrange(50)}",
                    amount=rng.randrange(100, 10_000),
                    method=rng.choice(["balance", "card"]),
                ),
                device_id=None,
            ),
        )
        pid = uuid.UUID(orjson.loads(outcome.body)["payment_id"])
        ids.append(pid)
        count += 1
        if rng.random() < refund_share:
            handlers.record_alone(
                engine,
                refund_command(
                    policy=policy(f"r-{seed}-{i}"),
                    payment_id=pid,
                    command=CreateRefund(amount=rng.randrange(1, 100)),
                ),
            )
            count += 1
            if second_refund_share and rng.random() < second_refund_share:
                # At most 99 + 1 refunded of at least 100 captured: never refused.
                handlers.record_alone(
                    engine,
                    refund_command(
                        policy=policy(f"r2-{seed}-{i}"),
                        payment_id=pid,
                        command=CreateRefund(amount=1),
                    ),
                )
                count += 1
    return Traffic(ids, count)


def write_store_events(engine: Engine) -> list[Event]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(events.c.body).order_by(events.c.payment_id, events.c.version)
        )
        return [parse_event(body) for (body,) in rows]


def fold_by_payment(all_events: Sequence[Event]) -> dict[uuid.UUID, PaymentState]:
    grouped: dict[uuid.UUID, list[Event]] = {}
    for event in sorted(all_events, key=lambda e: (e.payment_id, e.version)):
        grouped.setdefault(event.payment_id, []).append(event)
    folded = {pid: fold(evs) for pid, evs in grouped.items()}
    return {pid: state for pid, state in folded.items() if state is not None}


Totals = dict[tuple[str, object, str], tuple[int, int, int, int]]


def expected_totals(all_events: Sequence[Event], zone: ZoneInfo = TOKYO) -> tuple[Totals, Totals]:
    daily: dict[tuple[str, object, str], list[int]] = {}
    hourly: dict[tuple[str, object, str], list[int]] = {}
    for e in all_events:
        local = e.occurred_at.astimezone(zone)
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        for table, bucket in ((daily, local.date()), (hourly, hour)):
            sums = table.setdefault((e.merchant_id, bucket, e.payload.currency), [0, 0, 0, 0])
            if isinstance(e, PaymentCaptured):
                sums[0] += 1
                sums[1] += e.payload.amount
            else:
                sums[2] += 1
                sums[3] += e.payload.amount
    return (
        {k: (v[0], v[1], v[2], v[3]) for k, v in daily.items()},
        {k: (v[0], v[1], v[2], v[3]) for k, v in hourly.items()},
    )


def read_payments(engine: Engine) -> dict[uuid.UUID, tuple[int, int, int, str]]:
    with engine.connect() as conn:
        return {
            row.payment_id: (row.captured_amount, row.refunded_amount, row.version, row.status)
            for row in conn.execute(sa.select(payments))
        }


def read_totals(engine: Engine) -> tuple[Totals, Totals]:
    result = []
    with engine.connect() as conn:
        for table, bucket in ((merchant_daily_totals, "day"), (merchant_hourly_totals, "hour")):
            rows = conn.execute(sa.select(table))
            totals: Totals = {}
            for row in rows:
                key_bucket: date | datetime = getattr(row, bucket)
                totals[(row.merchant_id, key_bucket, row.currency)] = (
                    int(row.payments_count),
                    int(row.payments_amount),
                    int(row.refunds_count),
                    int(row.refunds_amount),
                )
            result.append(totals)
    return result[0], result[1]


def read_side_matches(write_engine: Engine, read_engine: Engine) -> bool:
    try:
        assert_read_side_matches(write_engine, read_engine)
    except AssertionError:
        return False
    return True


def assert_read_side_matches(write_engine: Engine, read_engine: Engine) -> None:
    """The read side equals the fold of the write store, exactly."""
    all_events = write_store_events(write_engine)
    expected = {
        pid: (s.captured_amount, s.refunded_amount, s.version, s.status)
        for pid, s in fold_by_payment(all_events).items()
    }
    actual = read_payments(read_engine)
    assert actual == expected
    daily, hourly = expected_totals(all_events)
    actual_daily, actual_hourly = read_totals(read_engine)
    assert actual_daily == daily
    assert actual_hourly == hourly


async def produce(
    bootstrap: str,
    topic: str,
    items: Sequence[AnyEvent | tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> None:
    """Put events (payments' or wallets', as the relay would) or raw (key, value, headers)
    records on the topic, in this order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for item in items:
            key, value, headers = item if isinstance(item, tuple) else record_parts(item)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


# -- wallets on the read side -------------------------------------------------------------------

WalletRows = tuple[
    dict[str, tuple[str, int, int]], dict[tuple[str, int], tuple[str, int, str, int]]
]
"""Each user's (currency, balance, version), and each movement (user, version) ->
(kind, signed amount, currency, balance_after)."""


def write_store_wallet_events(engine: Engine) -> list[WalletEvent]:
    """Every wallet event of the write store, each wallet's in version order."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(wallet_events.c.body).order_by(
                wallet_events.c.user_id, wallet_events.c.version
            )
        )
        return [parse_wallet_event(body) for (body,) in rows]


def expected_wallets(movements: Sequence[WalletEvent]) -> WalletRows:
    """The read side's wallets and statements as the fold of ``movements``."""
    by_user: dict[str, list[WalletEvent]] = {}
    for event in sorted(movements, key=lambda e: (e.user_id, e.version)):
        by_user.setdefault(event.user_id, []).append(event)
    balances: dict[str, tuple[str, int, int]] = {}
    statements: dict[tuple[str, int], tuple[str, int, str, int]] = {}
    for user_id, history in by_user.items():
        wallet = fold_wallet(user_id, [movement_of(e) for e in history])
        assert wallet.currency is not None
        balances[user_id] = (wallet.currency, wallet.balance, wallet.version)
        for event in history:
            m = movement_of(event)
            statements[user_id, m.version] = (m.kind, m.amount, m.currency, m.balance_after)
    return balances, statements


def read_wallets(engine: Engine) -> WalletRows:
    with engine.connect() as conn:
        balances = {
            r.user_id: (r.currency, int(r.balance), int(r.version))
            for r in conn.execute(sa.select(wallets))
        }
        statements = {
            (m.user_id, int(m.version)): (m.kind, int(m.amount), m.currency, int(m.balance_after))
            for m in conn.execute(sa.select(wallet_movements))
        }
    return balances, statements


def assert_wallets_match(write_engine: Engine, read_engine: Engine) -> None:
    """Every wallet on the read side, balance and statement, equals the fold of its stream in
    the write store, exactly."""
    want_balances, want_statements = expected_wallets(write_store_wallet_events(write_engine))
    balances, statements = read_wallets(read_engine)
    assert balances == want_balances
    assert statements == want_statements


def wallets_match(write_engine: Engine, read_engine: Engine) -> bool:
    try:
        assert_wallets_match(write_engine, read_engine)
    except AssertionError:
        return False
    return True


# -- delivery by stream --------------------------------------------------------------------------

StreamEvent = tuple[uuid.UUID, int]
"""(stream id, version) of an event: its payment's id, or its wallet's ``wallet_stream_id``
(the outbox row's ``payment_id`` and the Kafka key, either way)."""


def stored_stream_events(engine: Engine) -> list[StreamEvent]:
    """(stream id, version) of every event in the write store, payments' and wallets'."""
    with engine.connect() as conn:
        of_payments = [
            (row.payment_id, row.version)
            for row in conn.execute(sa.select(events.c.payment_id, events.c.version))
        ]
        of_wallets = [
            (wallet_stream_id(row.user_id), row.version)
            for row in conn.execute(sa.select(wallet_events.c.user_id, wallet_events.c.version))
        ]
    return of_payments + of_wallets


def published_stream_event(record: ConsumerRecord[bytes, bytes]) -> StreamEvent:
    """(stream id, version) of a record read from the topic, parsed as its ``event_type``
    header says (a payment's or a wallet's event); checks the key is the event's stream."""
    assert record.value is not None
    event = parse_any_event(record.value)
    assert dict(record.headers).get("event_type") == event.event_type.encode(), (
        "the header is not the event's type"
    )
    stream_id, version = stream_of(event), event.version
    assert record.key == kafka_key(stream_id), "key is not the event's stream id"
    return stream_id, version


def assert_streams_delivered_in_order(
    engine: Engine,
    *logs: Sequence[ConsumerRecord[bytes, bytes]],
    exactly_once: bool = False,
    may_repeat: Collection[StreamEvent] | None = None,
) -> Counter[StreamEvent]:
    """Every event of the write store, of payments and of wallets, is on the topic and nothing
    else is; all of a stream's events are in one partition, where the first copy of each
    version comes in version order.

    ``logs`` are what was read from each incarnation of the broker, oldest first (a restarted
    embedded broker is a new, empty log that continues the old one). Copies: none at all with
    ``exactly_once``; only of the events in ``may_repeat`` if given; otherwise any (at least
    once). Returns the number of copies of each event."""
    stored = Counter(stored_stream_events(engine))
    assert stored, "the write store holds no events"
    assert max(stored.values()) == 1
    copies: Counter[StreamEvent] = Counter()
    partition_of: dict[uuid.UUID, set[int]] = {}
    first_seen: dict[uuid.UUID, list[int]] = {}
    for log in logs:
        for record in sorted(log, key=lambda r: (r.partition, r.offset)):
            stream_id, version = published_stream_event(record)
            partition_of.setdefault(stream_id, set()).add(record.partition)
            if (stream_id, version) not in copies:
                first_seen.setdefault(stream_id, []).append(version)
            copies[stream_id, version] += 1

    missing = stored.keys() - copies.keys()
    assert not missing, f"{len(missing)} stored events never reached the topic, e.g. {min(missing)}"
    unknown = copies.keys() - stored.keys()
    assert not unknown, f"{len(unknown)} events on the topic are not in the write store"
    split = {s: parts for s, parts in partition_of.items() if len(parts) > 1}
    assert not split, f"{len(split)} streams have events in several partitions"
    out_of_order = {
        s: versions for s, versions in first_seen.items() if versions != sorted(versions)
    }
    assert not out_of_order, (
        f"{len(out_of_order)} streams' events reached the topic out of version order, "
        f"e.g. {next(iter(out_of_order.items()))}"
    )
    repeated = {event for event, n in copies.items() if n > 1}
    if exactly_once:
        assert not repeated, f"{len(repeated)} events were published more than once"
    if may_repeat is not None:
        unexpected = repeated - set(may_repeat)
        assert not unexpected, f"{len(unexpected)} events were published twice for no reason"
    return copies
