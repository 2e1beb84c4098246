"""Test helpers: request bodies, reading the write store and the topic back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.engine import Engine

from kessai.auth import create_key
from kessai.broker import EmbeddedBroker, free_port
from kessai.db import create_db_engine
from kessai.schema.write import events, idempotency_keys, outbox, relay_leases
from kessai.settings import Settings
from migrations import upgrade

_keys = itertools.count()

UNLIMITED = "1000000/second"
"""A rate limit no test reaches: tests drive the APIs far faster than any one client should."""
UNBOUNDED_IN_FLIGHT = 10_000
"""A load-shedding bound no test reaches (``KESSAI_OVERLOAD_MAX_IN_FLIGHT``): tests send a
thousand requests at once to one process; shedding is tested alone (``test_overload.py``)."""


def new_key(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex}-{next(_keys)}"


FUNDS = 10**11
"""What ``fund`` puts in a test's wallet: more than any test pays (the limit is tested alone,
``tests/integration/test_wallet_payments.py``)."""


def fund(
    target: Settings | Engine, *user_ids: str, amount: int = FUNDS, currency: str = "JPY"
) -> None:
    """Top up each user's wallet by ``amount`` through the command API's own write path (a
    ``top_up_command`` recorded by ``handlers.record_alone``, as the top-ups route records it;
    no HTTP, so any test can fund the payers of its balance payments, whatever key it holds).
    A balance payment from a wallet nobody funded is 402 ``insufficient_balance``."""
    from command_service import handlers
    from command_service.routes.top_ups import top_up_command
    from command_service.schemas import CreateTopUp

    if isinstance(target, Settings):
        engine, shards = (
            create_db_engine(target.resolved_write_db_url(), pool_size=1),
            (target.outbox_shards),
        )
    else:
        engine, shards = target, Settings().outbox_shards
    try:
        for user_id in user_ids:
            policy = handlers.WritePolicy(
                client_id="test-funding",
                idempotency_key=new_key("fund"),
                retention=timedelta(hours=1),
                shards=shards,
                max_attempts=30,
            )
            handlers.record_alone(
                engine,
                top_up_command(
                    policy=policy,
                    user_id=user_id,
                    command=CreateTopUp(amount=amount, currency=currency, source="bank"),
                    limit=10**12,
                ),
            )
    finally:
        if engine is not target:
            engine.dispose()


PAYER = "user-1"
"""Who pays in ``payment_body``."""


def payment_body(**overrides: Any) -> dict[str, Any]:
    """A balance payment of 1,000 yen by ``PAYER``: fund the payer's wallet first (``fund``)."""
    body: dict[str, Any] = {
        "merchant_id": "merchant-1",
        "user_id": PAYER,
        "amount": 1000,
        "currency": "JPY",
        "method": "balance",
    }
    body.update(overrides)
    return body


def count_rows(engine: Engine) -> dict[str, int]:
    """How many rows each write-store table holds."""
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (events, outbox, idempotency_keys)
        }


def stored_events(engine: Engine) -> list[tuple[uuid.UUID, int]]:
    """(payment_id, version) of every event in the write store."""
    with engine.connect() as conn:
        return [
            (row.payment_id, row.version)
            for row in conn.execute(sa.select(events.c.payment_id, events.c.version))
        ]


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    at_least: int,
    within: float = 30.0,
    settle: float = 0.5,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read the topic from the beginning until ``at_least`` records arrived (then ``settle``
    seconds more, to catch extra copies) or ``within`` seconds.
    Assigns partitions directly: no consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = asyncio.get_running_loop().time() + within
        while not partitions:
            await consumer.topics()  # refreshes metadata
            partitions = consumer.partitions_for_topic(topic)
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"topic {topic} never appeared")
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        settle_until: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for part in batch.values():
                records.extend(part)
            now = loop.time()
            if len(records) >= at_least and settle_until is None:
                settle_until = now + settle
            if (settle_until is not None and now >= settle_until) or now > deadline:
                return records
    finally:
        await consumer.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 30.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` is true; fail the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def until_true(
    check: Callable[[], bool], *, within: float = 10.0, interval: float = 0.01
) -> None:
    """Like ``eventually`` for a plain (non-async, quick) ``check`` of in-process state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def create_payments(
    api: httpx.AsyncClient, count: int, *, refunded: int = 0, concurrency: int = 4
) -> dict[uuid.UUID, int]:
    """Create ``count`` payments of 1000 through the API, ``concurrency`` requests at a time;
    the first ``refunded`` of them then get one or two refunds of 100 (alternately), one after
    the other. Every request must answer 201. Returns payment id -> its number of events."""
    gate = asyncio.Semaphore(concurrency)

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            response = await api.post(path, json=body, headers={"Idempotency-Key": new_key()})
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def one(index: int) -> tuple[uuid.UUID, int]:
        created = await post("/v1/payments", payment_body(amount=1000))
        payment_id = uuid.UUID(created["payment_id"])
        refunds = (1 + index % 2) if index < refunded else 0
        for _ in range(refunds):
            await post(f"/v1/payments/{payment_id}/refunds", {"amount": 100, "reason": "test"})
        return payment_id, 1 + refunds

    return dict(await asyncio.gather(*(one(i) for i in range(count))))


@contextlib.contextmanager
def served_command_api(settings: Settings) -> Iterator[str]:
    """The command API in a uvicorn process of its own (one worker) on a free port, on the
    stores of ``settings``: real concurrency, its own event loop, Redis pool and write
    connections. Yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "KESSAI_HOME": str(settings.home),
        "KESSAI_WRITE_DB_URL": settings.resolved_write_db_url(),
        "KESSAI_READ_DB_URL": settings.resolved_read_db_url(),
        "KESSAI_KEYS_DB_URL": settings.resolved_keys_db_url(),
        "KESSAI_REDIS_URL": settings.redis_url or "",
        "KESSAI_RATE_LIMIT_PER_IP": settings.rate_limit_per_ip,
        "KESSAI_RATE_LIMIT_WRITES": settings.rate_limit_writes,
        # Clients by the hundred must reach the rate limiter, not the load shedder before it.
        "KESSAI_OVERLOAD_MAX_IN_FLIGHT": str(settings.overload_max_in_flight),
        "KESSAI_WALLET_MAX_BALANCE": str(settings.wallet_max_balance),
        "KESSAI_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "command_service.app:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    # A client starved by hundreds of siblings may come back to an idle connection after
    # uvicorn's 5 s keep-alive closed it, and read a reset instead of an answer.
    command += ["--timeout-keep-alive", "60"]
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "the command API stopped while starting"
            assert time.monotonic() < deadline, "the command API did not start in 30 s"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of each partition of ``topic``, as the broker reports it.

    The embedded broker creates the topic (4 partitions) if it does not exist yet, and reports
    the base offset of a partition's last record batch + 1: with batches of several records
    that is less than the real end, so use it as a lower bound or a "has anything changed"
    signal, never as a record count."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps) if tps else {}
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def unpublished_events(engine: Engine) -> set[tuple[uuid.UUID, int]]:
    """(payment_id, version) of every event still in the outbox."""
    with engine.connect() as conn:
        return {
            (row.payment_id, row.version)
            for row in conn.execute(sa.select(outbox.c.payment_id, outbox.c.version))
        }


def lease_table(engine: Engine) -> dict[int, tuple[str | None, datetime | None]]:
    """shard -> (owner, expires_at) of the relay leases."""
    with engine.connect() as conn:
        return {
            row.shard: (row.owner, row.expires_at)
            for row in conn.execute(sa.select(relay_leases)).all()
        }


@contextlib.contextmanager
def own_broker(tmp_path: Path, name: str = "broker") -> Iterator[EmbeddedBroker]:
    """A broker of this test alone, on a free port, stopped (or already killed) at the end."""
    broker = EmbeddedBroker(free_port(), log_path=tmp_path / f"{name}.log")
    broker.start()
    try:
        yield broker
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.process.send_signal(signal.SIGCONT)  # in case a test froze it
        broker.stop()


def restart_on_same_port(broker: EmbeddedBroker) -> None:
    """Start ``broker`` again after a kill: same address, a new and empty cluster."""
    assert broker.process is not None
    assert broker.process.poll() is not None, "the broker still runs"
    broker.stop()  # closes the log file of the killed process
    broker.start()


def api_key(settings: Settings, *scopes: str, name: str = "test") -> str:
    """A new API key with ``scopes`` in the key store of ``settings`` (migrated first)."""
    url = settings.resolved_keys_db_url()
    upgrade("keys", url)
    engine = create_db_engine(url, pool_size=1)
    try:
        return create_key(engine, scopes, name)[1]
    finally:
        engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
