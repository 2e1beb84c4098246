"""A write recorded alone (group commit off, or after its batch failed) against what it cannot
see coming: another process's refund of the same payment committed between its read and its
insert, or a failure between its inserts and its commit. Nothing is lost, nothing is recorded
twice, and the client's answer says what happened.

The other writer is played from a SQLAlchemy event on the app's own write engine, at the moment
the app inserts its events. Conflicting writers exist on MySQL/MariaDB only (SQLite takes the
write lock for the whole transaction), so the conflict tests run there. The payments are
balance payments by ``PAYER``, whose wallet each test funds first (``fund``): a payment and a
refund of one each also move the wallet and queue its event.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE
from kessai.db import create_db_engine
from kessai.settings import Settings
from tests.helpers import PAYER, api_key, bearer, count_rows, fund, new_key, payment_body
from tests.integration import command_api
from tests.integration.command_api import rows_added


def write_engine_of(app: FastAPI) -> Engine:
    engine: Engine = app.state.resources.engine
    return engine


@contextlib.asynccontextmanager
async def running(
    settings: Settings, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The command API in process with ``overrides``; an unexpected failure is its 500."""
    app = create_app(settings.model_copy(update=overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://command.test",
            headers=bearer(api_key(settings, PAYMENTS_WRITE)),
        ) as client,
    ):
        yield app, client


@contextlib.contextmanager
def before_statement(
    engine: Engine, prefix: str, action: Callable[[sa.Connection], None]
) -> Iterator[None]:
    """Run ``action`` just before ``engine`` executes a statement starting with ``prefix``."""

    def listener(conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith(prefix):
            action(conn)

    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)


def refund_from_elsewhere(engine: Engine, payment_id: uuid.UUID, shards: int) -> None:
    """Another process refunds 1 of the payment at its next version (the real refund
    decision on the payment's folded state and its payer's wallet), and commits."""
    with engine.begin() as conn:
        events = command_api.refund_from_elsewhere(conn, payment_id, 1)
        handlers.append_events(conn, events, shards=shards)


async def capture(api: httpx.AsyncClient, amount: int = 1000) -> uuid.UUID:
    response = await api.post(
        "/v1/payments",
        json=payment_body(amount=amount),
        headers={"Idempotency-Key": new_key()},
    )
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["payment_id"])


async def post_refund(api: httpx.AsyncClient, payment_id: uuid.UUID, key: str) -> httpx.Response:
    return await api.post(
        f"/v1/payments/{payment_id}/refunds", json={"amount": 100}, headers={"Idempotency-Key": key}
    )


@pytest.fixture
def other_writer(backend: str, settings: Settings) -> Iterator[Engine]:
    if backend != "mysql":
        pytest.skip("SQLite serializes writers: no transaction can slip in between")
    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=1)
    yield engine
    engine.dispose()


async def test_a_refund_that_lost_its_version_to_another_process_is_decided_again(
    settings: Settings, other_writer: Engine, write_engine: Engine
) -> None:
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, group_commit=False) as (app, api):
        payment_id = await capture(api)
        fired: list[int] = []

        def slip_in(_conn: sa.Connection) -> None:
            if not fired:
                fired.append(1)
                refund_from_elsewhere(other_writer, payment_id, settings.outbox_shards)

        with before_statement(write_engine_of(app), "INSERT INTO EVENTS", slip_in):
            response = await post_refund(api, payment_id, new_key())

    assert fired == [1]
    assert response.status_code == 201, response.text
    # Decided again on the other refund's state: the next version, the running total.
    assert (response.json()["version"], response.json()["refunded_amount"]) == (3, 101)
    # The payment and two refunds, each queued with its wallet's movement; the other process
    # records no key here.
    assert rows_added(write_engine, funded) == {"events": 3, "outbox": 6, "idempotency_keys": 2}


async def test_a_refund_that_keeps_losing_its_version_is_409_and_keeps_its_key(
    settings: Settings, other_writer: Engine, write_engine: Engine
) -> None:
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, group_commit=False, refund_max_attempts=2) as (app, api):
        payment_id = await capture(api)
        key = new_key("contended")

        def slip_in(_conn: sa.Connection) -> None:
            refund_from_elsewhere(other_writer, payment_id, settings.outbox_shards)

        with before_statement(write_engine_of(app), "INSERT INTO EVENTS", slip_in):
            refused = await post_refund(api, payment_id, key)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "concurrent_modification"
        assert refused.json()["error"]["details"] == {"attempts": 2}
        # Two other refunds got in, the refused one wrote nothing, its key included.
        assert rows_added(write_engine, funded) == {
            "events": 3,
            "outbox": 6,  # each event with its wallet's movement
            "idempotency_keys": 1,
        }

        retried = await post_refund(api, payment_id, key)
    assert retried.status_code == 201, retried.text
    assert (retried.json()["version"], retried.json()["refunded_amount"]) == (4, 102)
    assert rows_added(write_engine, funded) == {"events": 4, "outbox": 8, "idempotency_keys": 2}


class Crash(RuntimeError):
    """The process failing between its inserts and its commit."""


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "alone"])
async def test_a_failure_between_insert_and_commit_records_nothing_twice(
    settings: Settings, write_engine: Engine, group_commit: bool
) -> None:
    """The transaction is rolled back. In a batch, the request is then recorded alone and
    answered 201; alone, the client gets a 500 and its retry with the same key is recorded
    once."""
    fund(settings, PAYER)
    funded = count_rows(write_engine)
    async with running(settings, group_commit=group_commit) as (app, api):
        crashes: list[int] = []

        def crash_once(_conn: sa.Connection) -> None:
            if not crashes:
                crashes.append(1)
                raise Crash

        key = new_key("crash")
        engine = write_engine_of(app)
        sa.event.listen(engine, "commit", crash_once)
        try:
            first = await api.post(
                "/v1/payments", json=payment_body(), headers={"Idempotency-Key": key}
            )
        finally:
            sa.event.remove(engine, "commit", crash_once)
        assert crashes == [1]
        if group_commit:
            assert first.status_code == 201, first.text
        else:
            assert first.status_code == 500, first.text
            assert count_rows(write_engine) == funded
        second = await api.post(
            "/v1/payments", json=payment_body(), headers={"Idempotency-Key": key}
        )
    assert second.status_code == 201, second.text
    if group_commit:
        assert second.headers["Idempotent-Replayed"] == "true"
        assert second.content == first.content
    # One payment, its wallet's debit, one key.
    assert rows_added(write_engine, funded) == {"events": 1, "outbox": 2, "idempotency_keys": 1}
