"""Group commit (``command_service/batching.py``): concurrent writes share one transaction,
and every request still gets the answer, and the failure, that it would have got alone.

Every test runs on SQLite and on MySQL/MariaDB, with the real app and real write stores. Commits
are counted with a SQLAlchemy event listener on the app's own write engine. The payments are
balance payments by ``PAYER``, whose wallet each test funds first (``fund``): each one also
debits the wallet, in the same transaction, and queues the wallet's event too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.app import create_app
from command_service.handlers import Recorder
from command_service.routes.payments import capture_command
from command_service.schemas import CreatePayment
from kessai.auth import PAYMENTS_WRITE
from kessai.db import create_db_engine
from kessai.events import wallet_stream_id
from kessai.ledger import fold
from kessai.schema.write import events, idempotency_keys, outbox
from kessai.settings import Settings
from tests.helpers import PAYER, api_key, bearer, count_rows, fund, new_key, payment_body
from tests.integration.command_api import refund_from_elsewhere, rows_added

PAYMENTS = "/v1/payments"


def refunds_path(payment_id: str) -> str:
    return f"/v1/payments/{payment_id}/refunds"


@pytest.fixture
def key(settings: Settings) -> str:
    return api_key(settings, PAYMENTS_WRITE)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, key: str, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The command API in process with ``overrides`` applied to its settings."""
    app = create_app(settings.model_copy(update=overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(key),
        ) as client,
    ):
        yield app, client


@contextlib.contextmanager
def counting_commits(engine: Engine) -> Iterator[list[int]]:
    """``[n]``: how many transactions ``engine`` committed while the block ran."""
    commits = [0]

    def on_commit(_conn: sa.Connection) -> None:
        commits[0] += 1

    sa.event.listen(engine, "commit", on_commit)
    try:
        yield commits
    finally:
        sa.event.remove(engine, "commit", on_commit)


async def batch_sizes(api: httpx.AsyncClient) -> tuple[float, float]:
    """(batches committed, requests they held) from ``/metrics``."""
    response = await api.get("/metrics")
    assert response.status_code == 200
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name.startswith("kessai_group_commit_batch_size")
    }
    return samples["kessai_group_commit_batch_size_count"], samples[
        "kessai_group_commit_batch_size_sum"
    ]


async def fallbacks(api: httpx.AsyncClient) -> float:
    return await counter(api, "kessai_group_commit_fallbacks_total")


async def counter(api: httpx.AsyncClient, name: str) -> float:
    response = await api.get("/metrics")
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


async def post_payment(
    api: httpx.AsyncClient, idempotency_key: str, **overrides: Any
) -> httpx.Response:
    return await api.post(
        PAYMENTS, json=payment_body(**overrides), headers={"Idempotency-Key": idempotency_key}
    )


async def post_refund(
    api: httpx.AsyncClient, payment_id: str, amount: int, idempotency_key: str | None = None
) -> httpx.Response:
    return await api.post(
        refunds_path(payment_id),
        json={"amount": amount},
        headers={"Idempotency-Key": idempotency_key or new_key()},
    )


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def stored_answers(engine: Engine) -> dict[str, tuple[int, str]]:
    """Idempotency key -> (status, body) as recorded."""
    with engine.connect() as conn:
        return {
            row.idempotency_key: (row.response_status, row.response_body)
            for row in conn.execute(
                sa.select(
                    idempotency_keys.c.idempotency_key,
                    idempotency_keys.c.response_status,
                    idempotency_keys.c.response_body,
                )
            )
        }


def events_and_outbox(
    engine: Engine,
) -> tuple[list[tuple[uuid.UUID, int]], list[tuple[uuid.UUID, int]], list[int]]:
    """The payments' events in the store, sorted; the payments' outbox rows, and the versions
    of the outbox rows of ``PAYER``'s wallet (its funding top-up and its movements), each in
    outbox order. Checks that the outbox holds nothing else."""
    wallet = wallet_stream_id(PAYER)
    with engine.connect() as conn:
        stored = sorted(
            (row.payment_id, row.version)
            for row in conn.execute(sa.select(events.c.payment_id, events.c.version))
        )
        queued = [
            (row.payment_id, row.version)
            for row in conn.execute(
                sa.select(outbox.c.payment_id, outbox.c.version).order_by(outbox.c.outbox_id)
            )
        ]
    payments = {payment_id for payment_id, _ in stored}
    of_payments = [(stream, version) for stream, version in queued if stream in payments]
    of_wallet = [version for stream, version in queued if stream == wallet]
    assert len(of_payments) + len(of_wallet) == len(queued), "the outbox holds other streams"
    return stored, of_payments, of_wallet


def payment_state(engine: Engine, payment_id: str) -> Any:
    with engine.connect() as conn:
        payment = uuid.UUID(payment_id)
        return fold(handlers.load_events_of_payments(conn, {payment})[payment])


async def test_concurrent_payments_share_transactions_and_each_is_recorded_once(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    """200 payments from 64 concurrent clients: one event, one outbox row and one
    idempotency record each (holding the answer the client got), and one movement of the
    payer's wallet each, in fewer transactions."""
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, key) as (app, api):
        gate = asyncio.Semaphore(64)
        keys = [new_key("gc") for _ in range(200)]

        async def pay(idempotency_key: str, index: int) -> httpx.Response:
            async with gate:
                return await post_payment(api, idempotency_key, amount=100 + index)

        with counting_commits(app.state.resources.engine) as commits:
            responses = await asyncio.gather(*(pay(k, i) for i, k in enumerate(keys)))
            assert [r.status_code for r in responses] == [201] * 200
            batches, requests = await batch_sizes(api)

            # Each request's own answer: its own amount, a payment of its own.
            assert [r.json()["amount"] for r in responses] == [100 + i for i in range(200)]
            payment_ids = {r.json()["payment_id"] for r in responses}
            assert len(payment_ids) == 200
            assert requests == 200
            assert commits[0] == batches < 200, (commits[0], batches)

            # Replays, batched too, answer the recorded bytes and write nothing.
            replays = await asyncio.gather(*(pay(k, i) for i, k in enumerate(keys[:50])))
        assert [r.headers.get("Idempotent-Replayed") for r in replays] == ["true"] * 50
        assert [r.content for r in replays] == [r.content for r in responses[:50]]

    assert rows_added(write_engine, funded) == {
        "events": 200,
        "outbox": 200 + 200,  # each payment's event and its wallet's debit
        "idempotency_keys": 200,
    }
    stored, queued, wallet_queued = events_and_outbox(write_engine)
    assert stored == sorted((uuid.UUID(p), 1) for p in payment_ids)
    assert sorted(queued) == stored
    # The wallet's movements, one per payment after its top-up, queued in version order.
    assert wallet_queued == list(range(1, 202))
    answers = stored_answers(write_engine)
    for idempotency_key, response in zip(keys, responses, strict=True):
        assert answers[idempotency_key] == (201, response.text)


async def test_a_bad_request_gets_its_own_answer_while_its_batch_mates_succeed(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    """One batch of nine: a refund beyond the captured amount, a refund of an unknown
    payment and a key reused with another body each get their own 4xx and record nothing;
    the payments, the refunds that fit and a replay in the same batch succeed."""
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    reused, replayed = new_key("reused"), new_key("replayed")
    async with running(settings, key, group_commit=False) as (_, api):
        paid = await post_payment(api, new_key(), amount=10)
        first_reused = await post_payment(api, reused, amount=100)
        first_replayed = await post_payment(api, replayed, amount=300)
    pid = paid.json()["payment_id"]
    unknown = str(uuid.uuid4())
    unknown_key = new_key("unknown")

    # The batch is committed only when all nine are in it (or after 5 s).
    async with running(
        settings, key, group_commit_max_batch=9, group_commit_max_delay_ms=5_000
    ) as (app, api):
        with counting_commits(app.state.resources.engine) as commits:
            responses = await asyncio.gather(
                post_payment(api, new_key(), amount=1),
                post_payment(api, new_key(), amount=2),
                post_payment(api, new_key(), amount=3),
                post_refund(api, pid, 6),
                post_refund(api, pid, 6),
                post_refund(api, pid, 4),
                post_refund(api, unknown, 1, unknown_key),
                post_payment(api, reused, amount=200),
                post_payment(api, replayed, amount=300),
            )
        assert commits[0] == 1
        assert await batch_sizes(api) == (1, 9)
        new_payments, refunds = responses[:3], responses[3:6]
        missing, reuse, replay = responses[6:]

        assert [r.status_code for r in new_payments] == [201, 201, 201]
        assert [r.json()["amount"] for r in new_payments] == [1, 2, 3]
        assert sorted(r.status_code for r in refunds) == [201, 201, 409]
        refused = next(r for r in refunds if r.status_code == 409)
        assert error_code(refused) == "refund_exceeds_captured"
        details = refused.json()["error"]["details"]
        # Decided in arrival order: after the first 6, or after a 6 and the 4.
        assert details in ({"captured": 10, "refunded": r, "requested": 6} for r in (6, 10))
        accepted = sorted(
            (r.json() for r in refunds if r.status_code == 201), key=lambda b: b["version"]
        )
        assert [b["version"] for b in accepted] == [2, 3]
        assert accepted[-1]["refunded_amount"] == 10
        assert accepted[-1]["status"] == "refunded"
        assert (missing.status_code, error_code(missing)) == (404, "payment_not_found")
        assert (reuse.status_code, error_code(reuse)) == (422, "idempotency_key_reused")
        assert reuse.json()["error"]["details"] == {"fields": ["amount"]}
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == first_replayed.content
        assert first_reused.status_code == 201

    # Refusals recorded nothing, their keys included: the key is free for a new request.
    assert unknown_key not in stored_answers(write_engine)
    async with running(settings, key, group_commit=False) as (_, api):
        assert (await post_payment(api, unknown_key)).status_code == 201

    state = payment_state(write_engine, pid)
    assert (state.version, state.refunded_amount) == (3, 10)
    # Before: 3 payments. The batch: 3 payments, 2 refunds. After: 1 payment. Each event is
    # queued with its wallet's (a payment's debit, a refund's credit).
    assert rows_added(write_engine, funded) == {"events": 9, "outbox": 18, "idempotency_keys": 9}


async def test_concurrent_refunds_in_one_batch_never_exceed_the_captured_amount(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    """50 one-yen refunds of a ten-yen payment in one transaction: the running fold gives
    the ten that fit versions 2 to 11, and refuses the forty others."""
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, key, group_commit=False) as (_, api):
        pid = (await post_payment(api, new_key(), amount=10)).json()["payment_id"]
    async with running(
        settings, key, group_commit_max_batch=50, group_commit_max_delay_ms=5_000
    ) as (app, api):
        with counting_commits(app.state.resources.engine) as commits:
            responses = await asyncio.gather(*(post_refund(api, pid, 1) for _ in range(50)))
        assert commits[0] == 1

    accepted = sorted(
        (r.json() for r in responses if r.status_code == 201), key=lambda b: b["version"]
    )
    refused = [r for r in responses if r.status_code != 201]
    assert [b["version"] for b in accepted] == list(range(2, 12))
    assert [b["refunded_amount"] for b in accepted] == list(range(1, 11))
    assert len(refused) == 40
    for response in refused:
        assert error_code(response) == "refund_exceeds_captured"
        assert response.json()["error"]["details"]["refunded"] == 10
    assert rows_added(write_engine, funded) == {"events": 11, "outbox": 22, "idempotency_keys": 11}
    stored, queued, wallet_queued = events_and_outbox(write_engine)
    assert stored == [(uuid.UUID(pid), v) for v in range(1, 12)]
    assert queued == stored  # outbox ids follow the versions: published in order
    # So do the wallet's: its top-up, the payment's debit, the ten refunds' credits.
    assert wallet_queued == list(range(1, 13))


async def test_a_batch_that_fails_as_a_whole_falls_back_to_one_transaction_per_request(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    """Another writer takes version 2 of a payment that the batch refunds, after the batch
    read it: the batch's insert collides, the whole batch rolls back, and each request is
    recorded alone, with the answer it would have got without group commit.

    On MySQL the other writer is a second engine that commits a 1-yen refund first (and its
    wallet's credit); on SQLite (where the batch holds the write lock) its rows are written
    through the batch's own connection and rolled back with it."""
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, key, group_commit=False) as (_, api):
        paid = await post_payment(api, new_key(), amount=10)
    pid = paid.json()["payment_id"]
    url = settings.resolved_write_db_url()
    mysql = sa.make_url(url).get_backend_name() == "mysql"
    other = create_db_engine(url, pool_size=1)

    def foreign_refund(conn: sa.Connection) -> list[handlers.Event]:
        refund = refund_from_elsewhere(conn, uuid.UUID(pid), 1)
        assert refund[0].version == 2  # the version the batch read as free
        return refund

    attempts: list[int] = []

    def concurrent_writer(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        if mysql:
            with other.begin() as theirs:
                handlers.append_events(
                    theirs, foreign_refund(theirs), shards=settings.outbox_shards
                )
        else:
            handlers.append_events(conn, foreign_refund(conn), shards=settings.outbox_shards)

    try:
        async with running(
            settings,
            key,
            group_commit_max_batch=7,
            group_commit_max_delay_ms=5_000,
            group_commit_attempts=1,  # no second attempt as a batch: straight to one by one
        ) as (app, api):
            recorder: Recorder = app.state.resources.recorder
            recorder.before_write = concurrent_writer
            keys = [new_key("fallback") for _ in range(7)]
            responses = await asyncio.gather(
                *(post_refund(api, pid, 3, k) for k in keys[:4]),
                post_payment(api, keys[4], amount=1),
                post_payment(api, keys[5], amount=2),
                post_refund(api, str(uuid.uuid4()), 1, keys[6]),
            )
            assert attempts == [1]  # the requests were recorded alone, not as a batch again
            assert await fallbacks(api) == 1
            assert await batch_sizes(api) == (0, 0)
    finally:
        other.dispose()

    refunds, payments, missing = responses[:4], responses[4:6], responses[6]
    assert sorted(r.status_code for r in refunds) == [201, 201, 201, 409]
    assert [r.status_code for r in payments] == [201, 201]
    assert [r.json()["amount"] for r in payments] == [1, 2]
    assert (missing.status_code, error_code(missing)) == (404, "payment_not_found")
    foreign = 1 if mysql else 0  # on SQLite the other writer's row was rolled back
    accepted = sorted(
        (r.json() for r in refunds if r.status_code == 201), key=lambda b: b["version"]
    )
    assert [b["version"] for b in accepted] == [v + foreign for v in (2, 3, 4)]
    assert [b["refunded_amount"] for b in accepted] == [foreign + 3 * n for n in (1, 2, 3)]
    refused = next(r for r in refunds if r.status_code == 409)
    assert refused.json()["error"]["details"]["refunded"] == 9 + foreign

    state = payment_state(write_engine, pid)
    assert (state.version, state.refunded_amount) == (4 + foreign, 9 + foreign)
    answers = stored_answers(write_engine)
    for idempotency_key, response in zip(keys, responses, strict=True):
        if response.status_code == 201:
            assert answers[idempotency_key] == (201, response.text)
        else:
            assert idempotency_key not in answers
    events_now = 1 + foreign + 3 + 2
    assert rows_added(write_engine, funded) == {
        "events": events_now,
        "outbox": 2 * events_now,  # each event with its wallet's (a debit, or a credit)
        "idempotency_keys": 1 + 3 + 2,
    }


async def test_with_group_commit_off_each_request_is_its_own_transaction(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, key, group_commit=False) as (app, api):
        assert app.state.resources.recorder.committer is None
        with counting_commits(app.state.resources.engine) as commits:
            responses = await asyncio.gather(*(post_payment(api, new_key()) for _ in range(20)))
        assert [r.status_code for r in responses] == [201] * 20
        assert commits[0] == 20
        metrics = (await api.get("/metrics")).text
        assert "kessai_group_commit_batch_size" not in metrics
    assert rows_added(write_engine, funded) == {"events": 20, "outbox": 40, "idempotency_keys": 20}


async def test_a_batch_that_lost_a_race_is_decided_again_as_a_whole(
    settings: Settings, key: str, write_engine: Engine
) -> None:
    """Another process pays from the payer's wallet after the batch read it: the batch's
    debit collides on the wallet's next version, and the batch is decided again as one
    batch on the fresh balance (one more attempt, no fallback to one by one), every answer
    checked against what the other process left.

    On MySQL the other writer commits through a second engine; on SQLite (where the batch
    holds the write lock) through the batch's own connection, rolled back with it."""
    fund(settings, PAYER, amount=100)
    funded = count_rows(write_engine)
    url = settings.resolved_write_db_url()
    mysql = sa.make_url(url).get_backend_name() == "mysql"
    other = create_db_engine(url, pool_size=1)
    attempts: list[int] = []

    def concurrent_payer(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        policy = handlers.WritePolicy("elsewhere", new_key(), timedelta(hours=1), 8, 5)
        command = capture_command(
            policy=policy, command=CreatePayment(**payment_body(amount=60)), device_id=None
        )
        if mysql:
            with other.begin() as theirs:
                handlers.record_batch(theirs, [command])
        else:
            handlers.record_batch(conn, [command])

    try:
        async with running(
            settings, key, group_commit_max_batch=3, group_commit_max_delay_ms=5_000
        ) as (app, api):
            app.state.resources.recorder.before_write = concurrent_payer
            responses = await asyncio.gather(
                *(post_payment(api, new_key(), amount=30) for _ in range(3))
            )
            assert attempts == [1, 1]  # decided again once, as a batch
            assert await fallbacks(api) == 0
            assert await counter(api, "kessai_group_commit_retries_total") == 1
            assert await batch_sizes(api) == (1, 3)
    finally:
        other.dispose()

    foreign = 1 if mysql else 0  # on SQLite the other payment was rolled back
    # 100 yen: the other process's 60 (MySQL) leaves 40, one 30-yen payment; else three.
    accepted = [r for r in responses if r.status_code == 201]
    assert len(accepted) == (1 if mysql else 3)
    for refused in (r for r in responses if r.status_code != 201):
        assert refused.status_code == 402
        assert refused.json()["error"]["details"]["balance"] == 10
    assert rows_added(write_engine, funded)["events"] == foreign + len(accepted)
