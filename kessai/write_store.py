"""The write store's shared SQL: appending events of every kind with their outbox rows, and
reading the wallets and registrations a write decides against. Nothing here begins or commits:
each writer's transaction owner does (``command_service/handlers.py`` for the command API,
``rewards/`` for grants).

- Payments: ``append_events`` appends their events; a duplicate ``(payment_id, version)`` is the
  optimistic-concurrency check (``is_write_conflict``).
- Wallets: a wallet's balance is its newest movement (``kessai/wallets.py``): ``load_wallets``
  reads the newest row of every wallet a batch touches in one statement (a primary-key range
  per wallet, never a scan of its history); a duplicate ``(user_id, version)`` is a conflict.
- Registrations: ``load_registrations`` reads whether (and when) users are registered;
  ``user_registrations``' primary key (``user_id``) refuses a second registration of a user.
- Every event's outbox row is keyed by its stream (``kessai.events.stream_of``) and lands in
  the shard of that stream (``shard_of``), so one stream's events are published in order.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from kessai.campaigns import (
    AnyCampaignEvent,
    CampaignState,
    campaign_event_to_json,
    campaign_stream_id,
    fold_campaign,
    parse_campaign_event,
)
from kessai.db import upsert
from kessai.debts import Debts, parse_debts
from kessai.events import (
    AnyWalletEvent,
    PaymentCaptured,
    PaymentRefunded,
    UserRegistered,
    event_to_json,
    parse_event,
    registration_stream_id,
    registration_to_json,
    wallet_event_to_json,
    wallet_stream_id,
)
from kessai.grants import GrantKey, MonthKey
from kessai.schema.write import (
    campaign_budget,
    campaign_events,
    events,
    newest_of,
    newest_wallet_movements,
    outbox,
    reward_debts,
    reward_grants,
    user_registrations,
    wallet_events,
)
from kessai.wallets import Wallet, movement_of

PaymentEvent = PaymentCaptured | PaymentRefunded
WalletEvent = AnyWalletEvent
Event = PaymentEvent | WalletEvent | UserRegistered | AnyCampaignEvent


def shard_of(payment_id: uuid.UUID, shards: int) -> int:
    """The outbox shard of a stream: every event of one payment (or wallet, ...) lands in the
    same shard."""
    return zlib.crc32(payment_id.bytes) % shards


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


def append_events(conn: sa.Connection, new_events: Sequence[Event], *, shards: int) -> None:
    """Append events of payments, of wallets, registrations and campaigns, in primary-key order,
    and their outbox rows (a wallet event's under its stream id, ``wallet_stream_id``; a
    registration's under ``registration_stream_id``; a campaign's under
    ``campaign_stream_id``). A duplicate (payment_id, version), (user_id, version) or
    (campaign_id, version) raises ``IntegrityError``: that is the optimistic-concurrency check;
    so does a second registration of a user (``user_registrations``' primary key)."""
    payment_events: list[PaymentEvent] = []
    of_wallets: list[WalletEvent] = []
    registered: list[UserRegistered] = []
    of_campaigns: list[AnyCampaignEvent] = []
    for event in new_events:
        if isinstance(event, PaymentCaptured | PaymentRefunded):
            payment_events.append(event)
        elif isinstance(event, UserRegistered):
            registered.append(event)
        elif isinstance(event, AnyCampaignEvent):
            of_campaigns.append(event)
        else:
            of_wallets.append(event)
    payment_events.sort(key=lambda e: (e.payment_id, e.version))
    event_rows = []
    outbox_rows = []
    for event in payment_events:
        row = {
            "payment_id": event.payment_id,
            "version": event.version,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "body": event_to_json(event).decode(),
            "merchant_id": event.merchant_id,
            "amount": event.payload.amount,
            "currency": event.payload.currency,
            "occurred_at": event.occurred_at,
            "recorded_at": event.recorded_at,
        }
        event_rows.append(row)
        outbox_rows.append(_outbox_row(event.payment_id, row, shards))
    movements = wallet_rows(of_wallets)
    for row in movements:
        outbox_rows.append(_outbox_row(wallet_stream_id(str(row["user_id"])), row, shards))
    registrations = registration_rows(registered)
    for row in registrations:
        stream_id = registration_stream_id(str(row["user_id"]))
        outbox_rows.append(_outbox_row(stream_id, {**row, "version": 1}, shards))
    campaign_rows = campaign_event_rows(of_campaigns)
    for row in campaign_rows:
        outbox_rows.append(_outbox_row(campaign_stream_id(str(row["campaign_id"])), row, shards))
    # Plain multi-row INSERTs handed to the driver as text (``kessai.db.upsert``, as the
    # projector writes): SQLAlchemy's executemany of a compiled insert costs more per row.
    upsert(conn, events, event_rows)
    upsert(conn, wallet_events, movements)
    upsert(conn, user_registrations, registrations)
    upsert(conn, campaign_events, campaign_rows)
    upsert(conn, outbox, outbox_rows)  # none: an answer without events (a declined card)


def _outbox_row(stream_id: uuid.UUID, row: Mapping[str, Any], shards: int) -> dict[str, Any]:
    """The outbox row of an event's row: published keyed by its stream (payment or wallet)."""
    return {
        "shard": shard_of(stream_id, shards),
        "payment_id": stream_id,
        "version": row["version"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "schema_version": row["schema_version"],
        "created_at": row["recorded_at"],
        "body": row["body"],
    }


def load_wallets(conn: sa.Connection, user_ids: Collection[str]) -> dict[str, Wallet]:
    """The wallet of every user in ``user_ids`` as its newest movement leaves it
    (``Wallet.empty`` for a user nothing has moved for yet), in one read."""
    found = {user_id: Wallet.empty(user_id) for user_id in user_ids}
    if not found:
        return found
    rows = conn.execute(newest_wallet_movements(found))
    for user_id, version, currency, balance in rows:
        found[user_id] = Wallet(
            user_id=user_id, currency=currency, balance=balance, version=version
        )
    return found


def wallet_rows(new_events: Sequence[WalletEvent]) -> list[dict[str, Any]]:
    """Rows of ``wallet_events`` for ``new_events``, in primary-key order."""
    rows = []
    for event in sorted(new_events, key=lambda e: (e.user_id, e.version)):
        movement = movement_of(event)
        rows.append(
            {
                "user_id": event.user_id,
                "version": event.version,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "schema_version": event.schema_version,
                "currency": movement.currency,
                "amount": movement.amount,
                "balance_after": movement.balance_after,
                "recorded_at": event.recorded_at,
                "body": wallet_event_to_json(event).decode(),
            }
        )
    return rows


def registration_rows(new_events: Sequence[UserRegistered]) -> list[dict[str, Any]]:
    """Rows of ``user_registrations`` for ``new_events``, in primary-key order."""
    return [
        {
            "user_id": event.user_id,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "recorded_at": event.recorded_at,
            "body": registration_to_json(event).decode(),
        }
        for event in sorted(new_events, key=lambda e: e.user_id)
    ]


def load_registrations(conn: sa.Connection, user_ids: Collection[str]) -> dict[str, datetime]:
    """When each of ``user_ids`` that is registered was (its ``UserRegistered``'s
    ``recorded_at``), in one primary-key read."""
    if not user_ids:
        return {}
    r = user_registrations.c
    rows = conn.execute(sa.select(r.user_id, r.recorded_at).where(r.user_id.in_(sorted(user_ids))))
    return {str(user_id): recorded_at for user_id, recorded_at in rows}


def campaign_event_rows(new_events: Sequence[AnyCampaignEvent]) -> list[dict[str, Any]]:
    """Rows of ``campaign_events`` for ``new_events``, in primary-key order."""
    return [
        {
            "campaign_id": event.campaign_id,
            "version": event.version,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "schema_version": event.schema_version,
            "recorded_at": event.recorded_at,
            "body": campaign_event_to_json(event).decode(),
        }
        for event in sorted(new_events, key=lambda e: (e.campaign_id, e.version))
    ]


def load_campaigns(
    conn: sa.Connection, campaign_ids: Collection[str] | None = None
) -> dict[str, CampaignState]:
    """The state of each campaign of ``campaign_ids`` that exists (every campaign: ``None``),
    folded from its stream in one primary-key read. Campaigns are few and their streams short
    (a creation, a few changes, a stop or an exhaustion): grants live in ``campaign_budget``."""
    c = campaign_events.c
    query = sa.select(c.campaign_id, c.body).order_by(c.campaign_id, c.version)
    if campaign_ids is not None:
        if not campaign_ids:
            return {}
        query = query.where(c.campaign_id.in_(sorted(campaign_ids)))
    streams: dict[str, list[AnyCampaignEvent]] = {}
    for campaign_id, body in conn.execute(query):
        streams.setdefault(str(campaign_id), []).append(parse_campaign_event(body))
    return {campaign_id: fold_campaign(stream) for campaign_id, stream in streams.items()}


def load_granted(conn: sa.Connection, campaign_ids: Collection[str]) -> dict[str, Granted]:
    """What each campaign of ``campaign_ids`` has granted (net of take-backs) as its newest
    ``campaign_budget`` row leaves it (``Granted(0, 0)`` for one that has granted nothing),
    in one read: a primary-key range per campaign, however many batches it has granted."""
    found = {campaign_id: Granted(version=0, amount=0) for campaign_id in campaign_ids}
    if not found:
        return found
    b = campaign_budget.c
    rows = conn.execute(newest_of(b.campaign_id, found, b.campaign_id, b.version, b.granted_after))
    for campaign_id, version, granted_after in rows:
        found[str(campaign_id)] = Granted(version=version, amount=granted_after)
    return found


@dataclass(frozen=True, slots=True)
class Granted:
    """A campaign's total granted (net of take-backs) as its newest ``campaign_budget`` row
    records it; the next row is ``version + 1``."""

    version: int
    amount: int


def load_captured(
    conn: sa.Connection, payment_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, PaymentCaptured]:
    """The ``PaymentCaptured`` (version 1) of each payment of ``payment_ids`` that the store
    holds, in one primary-key read."""
    if not payment_ids:
        return {}
    e = events.c
    rows = conn.execute(
        sa.select(e.body).where(e.payment_id.in_(sorted(payment_ids)), e.version == 1)
    ).scalars()
    found: dict[uuid.UUID, PaymentCaptured] = {}
    for body in rows:
        event = parse_event(body)
        if isinstance(event, PaymentCaptured):
            found[event.payment_id] = event
    return found


def load_debts(conn: sa.Connection, user_ids: Collection[str]) -> dict[str, Debts]:
    """What each user of ``user_ids`` owes campaigns, as the newest ``reward_debts`` row of
    each leaves it (``Debts.none`` for one who never owed anything), in one read: a
    primary-key range per user."""
    found = {user_id: Debts.none(user_id) for user_id in user_ids}
    if not found:
        return found
    d = reward_debts.c
    rows = conn.execute(newest_of(d.user_id, found, d.user_id, d.version, d.currency, d.body))
    for user_id, version, currency, body in rows:
        found[str(user_id)] = parse_debts(str(user_id), version, currency, body)
    return found


CHUNK = 1_000
"""Keys per statement (SQLite takes at most 32,766 parameters in one)."""
_K = TypeVar("_K", bound=tuple[str, ...])


def chunked(keys: Collection[_K]) -> Iterable[list[_K]]:
    """``keys`` in order, ``CHUNK`` at a time: one statement each."""
    ordered = sorted(keys)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


def existing_grant_keys(conn: sa.Connection, keys: Collection[GrantKey]) -> frozenset[GrantKey]:
    """Which of ``keys`` ``reward_grants`` holds: primary-key lookups (the grants the rewards
    service must not make again, and the reconciler must not report missing)."""
    g = reward_grants.c
    columns = sa.tuple_(g.campaign_id, g.user_id, g.period, g.grant_key)
    found: set[GrantKey] = set()
    for chunk in chunked(keys):
        rows = conn.execute(
            sa.select(g.campaign_id, g.user_id, g.period, g.grant_key).where(columns.in_(chunk))
        )
        found.update((str(c), str(u), str(p), str(k)) for c, u, p, k in rows)
    return frozenset(found)


def grant_month_sums(conn: sa.Connection, months: Collection[MonthKey]) -> dict[MonthKey, int]:
    """What each ``(campaign, user, month)`` of ``months`` has been granted, net of take-backs:
    a primary-key range each (what the per-user month cap reads)."""
    g = reward_grants.c
    columns = sa.tuple_(g.campaign_id, g.user_id, g.period)
    found: dict[MonthKey, int] = {}
    for chunk in chunked(months):
        rows = conn.execute(
            sa.select(g.campaign_id, g.user_id, g.period, sa.func.sum(g.amount))
            .where(columns.in_(chunk))
            .group_by(g.campaign_id, g.user_id, g.period)
        )
        for campaign_id, user_id, period, total in rows:
            found[(str(campaign_id), str(user_id), str(period))] = int(total)
    return found
