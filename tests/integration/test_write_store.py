"""The write store's own guarantees, enforced by the database: events are append-only, a
payment's versions are unique, and the migrations can be re-run and rolled back. (The wallet
streams' own: ``test_wallet_store.py``.)

The payments here are balance payments recorded through the write path: each test funds the
payer (``fund``) first."""

from __future__ import annotations

import uuid
from datetime import timedelta

import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.routes.payments import capture_command
from command_service.routes.refunds import refund_command
from command_service.schemas import CreatePayment, CreateRefund
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.events import PaymentCaptured, PaymentCapturedPayload
from kessai.ids import new_id
from kessai.schema.write import events
from migrations import alembic_config, upgrade
from tests.helpers import PAYER, count_rows, fund, new_key, payment_body, stored_events

WRITE_TABLES = {"events", "wallet_events", "outbox", "idempotency_keys", "relay_leases"}


def policy() -> handlers.WritePolicy:
    return handlers.WritePolicy(
        client_id="test-client",
        idempotency_key=new_key(),
        retention=timedelta(hours=1),
        shards=8,
        max_attempts=5,
    )


def capture(engine: Engine, amount: int = 1000) -> uuid.UUID:
    outcome = handlers.record_alone(
        engine,
        capture_command(
            policy=policy(),
            command=CreatePayment.model_validate(payment_body(amount=amount)),
            device_id=None,
        ),
    )
    assert outcome.status == 201
    return uuid.UUID(orjson.loads(outcome.body)["payment_id"])


def event_rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.select(events.c.payment_id, events.c.version, events.c.amount, events.c.body)
            )
        ]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET amount = 1",
        "UPDATE events SET body = '{}' WHERE version = 1",
        "DELETE FROM events",
        "DELETE FROM events WHERE version = 2",
    ],
)
def test_events_refuse_update_and_delete(write_engine: Engine, statement: str) -> None:
    fund(write_engine, PAYER)
    payment_id = capture(write_engine)
    outcome = handlers.record_alone(
        write_engine,
        refund_command(
            policy=policy(),
            payment_id=payment_id,
            command=CreateRefund(amount=100),
        ),
    )
    assert outcome.status == 201
    before = event_rows(write_engine)
    assert len(before) == 2

    with pytest.raises(sa.exc.DBAPIError) as refused, write_engine.begin() as conn:
        conn.execute(sa.text(statement))

    assert "append-only" in str(refused.value.orig)  # the trigger's message
    assert event_rows(write_engine) == before


def test_other_tables_are_not_append_only(write_engine: Engine) -> None:
    """The refusal is specific to events (the outbox is drained, keys expire)."""
    fund(write_engine, PAYER)
    capture(write_engine)
    with write_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox"))
        conn.execute(sa.text("DELETE FROM idempotency_keys"))
    assert count_rows(write_engine) == {"events": 1, "outbox": 0, "idempotency_keys": 0}


def test_duplicate_payment_version_is_refused(write_engine: Engine) -> None:
    fund(write_engine, PAYER)
    payment_id = capture(write_engine, amount=1000)
    before, rows_before = event_rows(write_engine), count_rows(write_engine)
    now = utcnow()
    impostor = PaymentCaptured(
        event_id=new_id(),
        payment_id=payment_id,
        version=1,
        merchant_id="merchant-1",
        occurred_at=now,
        recorded_at=now,
        payload=PaymentCapturedPayload(
            amount=999_999, currency="JPY", user_id="user-9", method="card"
        ),
    )

    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        handlers.append_events(conn, [impostor], shards=8)

    assert event_rows(write_engine) == before
    assert count_rows(write_engine) == rows_before  # its outbox row was not written either


def test_duplicate_event_id_is_refused(write_engine: Engine) -> None:
    fund(write_engine, PAYER)
    payment_id = capture(write_engine)
    with write_engine.connect() as conn:
        stored = handlers.load_events_of_payments(conn, {payment_id})[payment_id][0]
    elsewhere = stored.model_copy(update={"payment_id": uuid.uuid4()})

    with pytest.raises(sa.exc.IntegrityError), write_engine.begin() as conn:
        handlers.append_events(conn, [elsewhere], shards=8)

    assert stored_events(write_engine) == [(payment_id, 1)]


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_twice_is_harmless(write_db_url: str, write_engine: Engine) -> None:
    fund(write_engine, PAYER)
    payment_id = capture(write_engine)

    upgrade("write", write_db_url)
    upgrade("write", write_db_url)

    assert _tables(write_db_url) >= WRITE_TABLES
    assert stored_events(write_engine) == [(payment_id, 1)]
    with pytest.raises(sa.exc.DBAPIError), write_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events"))  # triggers not duplicated nor lost


def test_downgrade_to_base_then_upgrade(write_db_url: str) -> None:
    config = alembic_config("write", write_db_url)

    command.downgrade(config, "base")
    assert not (WRITE_TABLES & _tables(write_db_url))

    upgrade("write", write_db_url)
    assert _tables(write_db_url) >= WRITE_TABLES

    engine = create_db_engine(write_db_url, pool_size=1)
    try:
        fund(engine, PAYER)
        payment_id = capture(engine)
        assert stored_events(engine) == [(payment_id, 1)]
        with pytest.raises(sa.exc.DBAPIError) as refused, engine.begin() as conn:
            conn.execute(sa.text("UPDATE events SET amount = 2"))
        assert "append-only" in str(refused.value.orig)
    finally:
        engine.dispose()
