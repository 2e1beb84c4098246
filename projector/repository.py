"""SQL of the projector: loading what a batch touches and writing what it changed.

Nothing here begins or commits: the batch loop owns the one transaction per batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from kessai.db import upsert_rows
from kessai.ledger import PaymentState
from kessai.schema.read import (
    campaign_minute_totals,
    campaign_totals,
    campaigns,
    dead_letters,
    merchant_daily_totals,
    merchant_hourly_totals,
    merchants,
    parked_events,
    payments,
    refunds,
    wallet_movements,
    wallets,
)
from kessai.wallets import Wallet
from projector.apply import Changes, Parked, PaymentRow, Snapshot, TotalsDelta
from projector.campaign_rows import GrantDelta, campaign_row_of, campaign_values
from projector.wallet_rows import WalletRow

T = TypeVar("T")
CHUNK = 2_000
WALLET_STREAM_UUID_VERSION = 5
"""``kessai.events.wallet_stream_id`` is a UUIDv5; payments are UUIDv7."""
CAMPAIGN_STREAM_UUID_VERSION = 8
"""``kessai.campaigns.campaign_stream_id`` is a UUID of version 8."""


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_snapshot(conn: sa.Connection, stream_ids: set[uuid.UUID]) -> Snapshot:
    """The rows, parked events and open dead letters of the payments, wallets and campaigns
    ``stream_ids`` name (payment ids, wallet stream ids, which are UUIDv5, and campaign stream
    ids, UUIDv8: only a batch holding some asks for wallets or campaigns)."""
    snapshot = Snapshot()
    ids = sorted(stream_ids)
    campaign_ids = [i for i in ids if i.version == CAMPAIGN_STREAM_UUID_VERSION]
    for chunk in _chunks(campaign_ids):
        for row in conn.execute(sa.select(campaigns).where(campaigns.c.stream_id.in_(chunk))):
            snapshot.campaigns[row.stream_id] = campaign_row_of(row)
    wallet_ids = [i for i in ids if i.version == WALLET_STREAM_UUID_VERSION]
    for chunk in _chunks(wallet_ids):
        for row in conn.execute(sa.select(wallets).where(wallets.c.stream_id.in_(chunk))):
            snapshot.wallets[row.stream_id] = WalletRow(
                wallet=Wallet(
                    user_id=row.user_id,
                    currency=row.currency,
                    balance=row.balance,
                    version=row.version,
                ),
                stream_id=row.stream_id,
                updated_at=row.updated_at,
            )
    for chunk in _chunks(ids):
        for row in conn.execute(sa.select(payments).where(payments.c.payment_id.in_(chunk))):
            snapshot.payments[row.payment_id] = _payment_row(row)
        for row in conn.execute(
            sa.select(parked_events).where(parked_events.c.payment_id.in_(chunk))
        ):
            snapshot.parked[(row.payment_id, row.version)] = Parked(
                payment_id=row.payment_id,
                version=row.version,
                reason=row.reason,
                body=row.body,
                topic=row.topic,
                partition=row.kafka_partition,
                offset=row.kafka_offset,
            )
        for pid, version in conn.execute(
            sa.select(dead_letters.c.payment_id, dead_letters.c.version).where(
                dead_letters.c.payment_id.in_(chunk), dead_letters.c.status == "open"
            )
        ):
            snapshot.dead_lettered.setdefault(pid, set()).add(version)
    return snapshot


def _payment_row(row: Any) -> PaymentRow:
    return PaymentRow(
        state=PaymentState(
            payment_id=row.payment_id,
            merchant_id=row.merchant_id,
            user_id=row.user_id,
            method=row.method,
            currency=row.currency,
            captured_amount=row.captured_amount,
            refunded_amount=row.refunded_amount,
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        ),
        store_id=row.store_id,
        order_ref=row.order_ref,
        metadata=row.metadata,
    )


def merchant_time_zone(conn: sa.Connection, merchant_id: str) -> str | None:
    return conn.execute(
        sa.select(merchants.c.time_zone).where(merchants.c.merchant_id == merchant_id)
    ).scalar_one_or_none()


# Rows are written as tuples in the tables' own column order (``_payment_values``, refunds).
PAYMENT_COLUMNS = tuple(c.name for c in payments.columns)
REFUND_COLUMNS = tuple(c.name for c in refunds.columns)
WALLET_COLUMNS = tuple(c.name for c in wallets.columns)
MOVEMENT_COLUMNS = tuple(c.name for c in wallet_movements.columns)
CAMPAIGN_COLUMNS = tuple(c.name for c in campaigns.columns)
GRANTED = ("granted_amount", "grants_count")
TOTALS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


def write_changes(conn: sa.Connection, changes: Changes, snapshot: Snapshot, now: datetime) -> None:
    """Write a batch's changes, every multi-row statement sorted by primary key."""
    _write_payments(conn, changes)
    _write_totals(conn, changes)
    _write_wallets(conn, changes)
    _write_campaigns(conn, changes)
    _write_parked(conn, changes, snapshot, now)
    _write_dead_letters(conn, changes, now)


def _write_payments(conn: sa.Connection, changes: Changes) -> None:
    upsert_rows(
        conn,
        payments,
        PAYMENT_COLUMNS,
        [_payment_values(row) for _, row in sorted(changes.payments.items())],
        replace=PAYMENT_COLUMNS[1:],
    )
    upsert_rows(
        conn,
        refunds,
        REFUND_COLUMNS,
        [
            (r.payment_id, r.version, r.refund_id, r.merchant_id, r.amount, r.currency,
             r.reason, r.created_at)
            for r in sorted(changes.refunds, key=lambda r: (r.payment_id, r.version))
        ],
    )  # fmt: skip


def _write_totals(conn: sa.Connection, changes: Changes) -> None:
    """The merchant's day and hour totals, added to in the batch's transaction."""
    upsert_rows(
        conn,
        merchant_daily_totals,
        ("merchant_id", "day", "currency", *TOTALS),
        [(*key, *_delta(delta)) for key, delta in sorted(changes.daily.items())],
        add=TOTALS,
    )
    upsert_rows(
        conn,
        merchant_hourly_totals,
        ("merchant_id", "hour", "currency", *TOTALS),
        [(*key, *_delta(delta)) for key, delta in sorted(changes.hourly.items())],
        add=TOTALS,
    )


def _write_wallets(conn: sa.Connection, changes: Changes) -> None:
    """Each wallet's new state and its statement lines. A movement is inserted only when its
    version is applied (the next one), so a replay of an applied version never gets here."""
    upsert_rows(
        conn,
        wallets,
        WALLET_COLUMNS,
        sorted(
            (w.wallet.user_id, w.stream_id, w.wallet.currency, w.wallet.balance,
             w.wallet.version, w.updated_at)
            for w in changes.wallets.values()
        ),
        replace=("currency", "balance", "version", "updated_at"),
    )  # fmt: skip
    upsert_rows(
        conn,
        wallet_movements,
        MOVEMENT_COLUMNS,
        [
            (m.user_id, m.version, m.event_id, m.kind, m.amount, m.currency, m.balance_after,
             m.payment_id, m.refund_id, m.top_up_id, m.merchant_id, m.source, m.reference,
             m.recorded_at, m.campaign_id)
            for m in sorted(changes.movements, key=lambda m: (m.user_id, m.version))
        ],
    )  # fmt: skip


def _write_campaigns(conn: sa.Connection, changes: Changes) -> None:
    """Each campaign's new state, and what the batch's grants add to their campaigns' figures
    (in the batch's transaction, like the merchants' totals)."""
    upsert_rows(
        conn,
        campaigns,
        CAMPAIGN_COLUMNS,
        sorted(campaign_values(row) for row in changes.campaigns.values()),
        replace=CAMPAIGN_COLUMNS[1:],
    )
    upsert_rows(
        conn,
        campaign_totals,
        ("campaign_id", *GRANTED),
        [(key, *_granted(delta)) for key, delta in sorted(changes.campaign_totals.items())],
        add=GRANTED,
    )
    upsert_rows(
        conn,
        campaign_minute_totals,
        ("campaign_id", "minute", *GRANTED),
        [(*key, *_granted(delta)) for key, delta in sorted(changes.campaign_minutes.items())],
        add=GRANTED,
    )


def _granted(delta: GrantDelta) -> tuple[int, int]:
    return delta.granted_amount, delta.grants_count


def _write_parked(conn: sa.Connection, changes: Changes, snapshot: Snapshot, now: datetime) -> None:
    new_parked = [p for key, p in sorted(changes.parked.items()) if key not in snapshot.parked]
    if new_parked:
        conn.execute(
            parked_events.insert(),
            [
                {
                    "payment_id": p.payment_id,
                    "version": p.version,
                    "reason": p.reason,
                    "body": p.body,
                    "topic": p.topic,
                    "kafka_partition": p.partition,
                    "kafka_offset": p.offset,
                    "parked_at": now,
                }
                for p in new_parked
            ],
        )
    for pid, version in sorted(changes.unparked):
        conn.execute(
            parked_events.delete().where(
                parked_events.c.payment_id == pid, parked_events.c.version == version
            )
        )


def _write_dead_letters(conn: sa.Connection, changes: Changes, now: datetime) -> None:
    if changes.dead_letters:
        conn.execute(
            dead_letters.insert(),
            [
                {
                    "payment_id": d.payment_id,
                    "version": d.version,
                    "topic": d.topic,
                    "kafka_partition": d.partition,
                    "kafka_offset": d.offset,
                    "raw_key": d.raw_key,
                    "raw_value": d.raw_value,
                    "headers": d.headers,
                    "reason": d.reason,
                    "status": d.status,
                    "created_at": now,
                    "resolved_at": now if d.status != "open" else None,
                }
                for d in changes.dead_letters
            ],
        )
    for pid, version in sorted(changes.resolved):
        conn.execute(
            dead_letters.update()
            .where(
                dead_letters.c.payment_id == pid,
                dead_letters.c.version == version,
                dead_letters.c.status == "open",
            )
            .values(status="resolved", resolved_at=now)
        )


def _payment_values(row: PaymentRow) -> tuple[Any, ...]:
    s = row.state
    return (
        s.payment_id, s.merchant_id, s.user_id, row.store_id, row.order_ref, s.method,
        s.currency, s.captured_amount, s.refunded_amount, s.status, s.version, row.metadata,
        s.created_at, s.updated_at,
    )  # fmt: skip


def _delta(delta: TotalsDelta) -> tuple[int, int, int, int]:
    return (
        delta.payments_count,
        delta.payments_amount,
        delta.refunds_count,
        delta.refunds_amount,
    )
