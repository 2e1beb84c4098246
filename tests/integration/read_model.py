"""Helpers for tests of the read side: fresh read databases, events, and projecting them.

Data gets into the read database the real way: events built with the event contract, wrapped
as the Kafka records the projector consumes, applied with ``projector.apply.apply_batch`` and
written with ``projector.repository.write_changes`` in one transaction, as a batch would be.
Plain functions only; test modules wrap them in fixtures.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
)
from kessai.ids import new_id
from kessai.offsets import OffsetRow, save_offsets
from kessai.schema.read import merchants, payments
from kessai.settings import DEFAULT_TOPIC
from migrations import upgrade
from projector.apply import Changes, Record, apply_batch, decode_batch
from projector.repository import load_snapshot, write_changes
from tests.backends import create_mysql_database, drop_mysql_database, server_connection
from tests.wallet_streams import AnyEvent, record_parts

Event = PaymentCaptured | PaymentRefunded
_offsets = itertools.count()


# -- databases (the MySQL helpers live in tests.backends) ------------------------------------------


def server_execute(server_url: str, *statements: str) -> None:
    """Run administrative statements (users, grants) as the server's test user."""
    with server_connection(server_url) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


@contextlib.contextmanager
def migrated_read_db(backend: str, tmp_path: Path, server_url: str | None) -> Iterator[str]:
    """A migrated, empty read database (a SQLite file, or a fresh MySQL database) for one test."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'read.db'}"
        upgrade("read", url)
        yield url
        return
    assert server_url is not None
    url, name = create_mysql_database(server_url)
    try:
        upgrade("read", url)
        yield url
    finally:
        drop_mysql_database(server_url, name)


# -- events ----------------------------------------------------------------------------------


def captured(
    *,
    at: datetime,
    merchant_id: str = "merchant-1",
    user_id: str = "user-1",
    amount: int = 1000,
    currency: str = "JPY",
    method: str = "card",
    store_id: str | None = None,
    order_ref: str | None = None,
    metadata: dict[str, str] | None = None,
    payment_id: uuid.UUID | None = None,
) -> PaymentCaptured:
    """A ``PaymentCaptured`` (version 1) that happened at ``at``."""
    return PaymentCaptured(
        event_id=new_id(),
        payment_id=payment_id or new_id(),
        version=1,
        merchant_id=merchant_id,
        occurred_at=at,
        recorded_at=at,
        payload=PaymentCapturedPayload.model_validate(
            {
                "amount": amount,
                "currency": currency,
                "user_id": user_id,
                "method": method,
                "store_id": store_id,
                "order_ref": order_ref,
                "metadata": metadata or {},
            }
        ),
    )


def refunded(
    payment: PaymentCaptured,
    *,
    at: datetime,
    amount: int,
    version: int = 2,
    refunded_total: int | None = None,
    reason: str | None = None,
) -> PaymentRefunded:
    """The refund making ``version`` of ``payment``; ``refunded_total`` defaults to ``amount``
    (the first refund)."""
    return PaymentRefunded(
        event_id=new_id(),
        payment_id=payment.payment_id,
        version=version,
        merchant_id=payment.merchant_id,
        occurred_at=at,
        recorded_at=at,
        payload=PaymentRefundedPayload(
            refund_id=new_id(),
            amount=amount,
            currency=payment.payload.currency,
            refunded_amount=refunded_total if refunded_total is not None else amount,
            reason=reason,
        ),
    )


def record_of(event: AnyEvent, *, topic: str = DEFAULT_TOPIC, partition: int = 0) -> Record:
    """The Kafka record the relay would publish for ``event`` (a payment's or a wallet's)."""
    key, value, headers = record_parts(event)
    return Record(
        topic=topic,
        partition=partition,
        offset=next(_offsets),
        key=key,
        value=value,
        headers=tuple(headers),
    )


# -- projecting ------------------------------------------------------------------------------


def project(
    engine: Engine,
    events: Iterable[AnyEvent],
    *,
    zone: str | Callable[[str], str] = "Asia/Tokyo",
    topic: str = DEFAULT_TOPIC,
    partition: int = 0,
) -> Changes:
    """Apply ``events`` as one projector batch, in one read-DB transaction.

    ``zone``: the time zone of every merchant, or a function of the merchant id. Fails the test
    if any event is dead-lettered: test data is meant to be valid.
    """
    records = [record_of(e, topic=topic, partition=partition) for e in events]

    def zone_of(merchant_id: str) -> ZoneInfo:
        return ZoneInfo(zone if isinstance(zone, str) else zone(merchant_id))

    with engine.begin() as conn:
        snapshot = load_snapshot(conn, decode_batch(records).stream_ids)
        changes = apply_batch(records, snapshot, zone_of)
        write_changes(conn, changes, snapshot, utcnow())
    assert not changes.dead_letters, changes.dead_letters
    assert not changes.parked, changes.parked
    return changes


def write_offsets(
    engine: Engine,
    positions: dict[int, tuple[datetime | None, datetime | None]],
    *,
    topic: str = DEFAULT_TOPIC,
) -> None:
    """Store the projector's position per partition: ``{partition: (last_event_at,
    caught_up_at)}``, as a batch does in its transaction."""
    with engine.begin() as conn:
        save_offsets(
            conn,
            topic,
            {
                p: OffsetRow(
                    next_offset=1, last_event_id=None, last_event_at=last, caught_up_at=caught
                )
                for p, (last, caught) in positions.items()
            },
            utcnow(),
        )


def set_merchant_time_zone(engine: Engine, merchant_id: str, time_zone: str) -> None:
    with engine.begin() as conn:
        conn.execute(merchants.insert().values(merchant_id=merchant_id, time_zone=time_zone))


def payment_row(
    *,
    created_at: datetime,
    merchant_id: str,
    user_id: str = "user-1",
    amount: int = 1000,
    payment_id: uuid.UUID | None = None,
    store_id: str | None = None,
    order_ref: str | None = None,
) -> dict[str, Any]:
    """A ``payments`` row as the projector writes one for a capture, for bulk inserts."""
    return {
        "payment_id": payment_id or new_id(),
        "merchant_id": merchant_id,
        "user_id": user_id,
        "store_id": store_id,
        "order_ref": order_ref,
        "method": "card",
        "currency": "JPY",
        "captured_amount": amount,
        "refunded_amount": 0,
        "status": "captured",
        "version": 1,
        "metadata": orjson.dumps({}).decode(),
        "created_at": created_at,
        "updated_at": created_at,
    }


def insert_payment_rows(engine: Engine, rows: Sequence[dict[str, Any]], chunk: int = 5_000) -> None:
    """Insert ``payments`` rows directly (multi-row inserts), for volume tests of reads."""
    with engine.begin() as conn:
        for start in range(0, len(rows), chunk):
            conn.execute(payments.insert(), list(rows[start : start + chunk]))
