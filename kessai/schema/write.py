"""The write store: append-only events, the transactional outbox, idempotency keys, relay leases.

The write store serves no queries. ``events`` has its primary key ``(payment_id, version)``,
which is both how a payment's history is read (a primary-key range) and the optimistic
concurrency check (two writers of the same next version collide on it), plus one unique key on
``event_id`` (UUIDv7, so it is time-ordered: the reconciler scans new events by it).
Triggers make the database refuse UPDATE and DELETE on events. ``wallet_events`` is the same
for each user's wallet, keyed ``(user_id, version)``, and also refuses a negative balance.
``user_registrations`` holds one ``UserRegistered`` per user: its primary key ``user_id`` is
what registers a user once, whatever races (two processes inserting one user: one fails).
``campaign_events`` is each campaign's stream (its rules, changes, stop, exhaustion);
``campaign_budget`` what each campaign has granted, one row per batch of grants; and
``reward_grants`` one row per grant (or take-back), whose primary key grants a payment (or a
registration) at most once per campaign and takes back a refund's share once; ``reward_debts``
what each user owes campaigns (cashback taken back after it was spent). All of them are
append-only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import sqlalchemy as sa

from kessai.db import NAMING_CONVENTION, BinaryUUID, UTCDateTime, ascii_id, long_text

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

events = sa.Table(
    "events",
    metadata,
    sa.Column("payment_id", BinaryUUID(), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("merchant_id", ascii_id(64), nullable=False),
    # Money in minor units of `currency`: the captured amount or this refund's amount.
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("occurred_at", UTCDateTime(), nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    # The canonical JSON envelope, exactly what is published.
    sa.Column("body", long_text(), nullable=False),
)

wallet_events = sa.Table(
    "wallet_events",
    metadata,
    # A wallet is its own stream (kessai/wallets.py): its movements by version, the newest one
    # holding the balance, so the balance is one primary-key read however long the history.
    # The primary key is the optimistic concurrency check, as (payment_id, version) is above.
    sa.Column("user_id", ascii_id(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # This movement, signed (into the wallet: positive), and the balance it leaves.
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.Column("body", long_text(), nullable=False),
    # Beneath the write path's own check: the database itself never holds a negative balance.
    sa.CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
)

user_registrations = sa.Table(
    "user_registrations",
    metadata,
    # One row per user, ever: the primary key refuses a second registration of a user, by
    # whichever process or transaction (the write path's own check only picks the answer).
    sa.Column("user_id", ascii_id(64), primary_key=True),
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.Column("body", long_text(), nullable=False),
)

campaign_events = sa.Table(
    "campaign_events",
    metadata,
    # A campaign is a stream of its own (kessai/campaigns.py): its creation, changes, stop and
    # exhaustion by version; the primary key is the optimistic concurrency check (two admins,
    # or an admin and the rewards service recording an exhaustion, collide on the next one).
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.Column("body", long_text(), nullable=False),
)

campaign_budget = sa.Table(
    "campaign_budget",
    metadata,
    # What a campaign has granted, as a stream of its own: one row per batch of grants (or
    # take-backs) the rewards service records, holding the total granted after it, so what is
    # granted is the newest row (one primary-key read) and the budget is never a row updated
    # per grant. The primary key is the concurrency check: two rewards instances granting from
    # one campaign at once collide on its next version, and one of them decides again.
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    # This batch's grants minus its take-backs (signed), how many grants it holds, and the
    # campaign's total granted after it (net of take-backs).
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("grants", sa.Integer, nullable=False),
    sa.Column("granted_after", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("granted_after >= 0", name="granted_after_not_negative"),
)

reward_grants = sa.Table(
    "reward_grants",
    metadata,
    # One row per grant (and per take-back), ever: the primary key is what grants a payment
    # (or a registration) at most once per campaign, whichever process or transaction tries
    # twice. ``period`` is the payment's month in the campaign's time zone (``YYYY-MM``) or
    # ``welcome``; ``grant_key`` the payment's id (a cashback), ``user`` (a welcome bonus) or
    # ``<payment id>/<refund id>`` (a take-back). A payment fixes its user and its month, so
    # the key is unique per (campaign, payment), and a user's grants of a month are one
    # primary-key range: what the per-user cap reads.
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    sa.Column("user_id", ascii_id(64), primary_key=True),
    sa.Column("period", ascii_id(7), primary_key=True),
    sa.Column("grant_key", ascii_id(80), primary_key=True),
    # Signed: a grant is positive, a take-back negative.
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # The wallet event that moved the money (``RewardGranted`` or ``RewardTakenBack``); for a
    # take-back of which the wallet could give nothing (all of it owed), an id of its own that
    # no event has: nothing moved.
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
)

reward_debts = sa.Table(
    "reward_debts",
    metadata,
    # What each user owes campaigns, as a stream of its own: one row per change (a take-back
    # the wallet could not pay in full, a debt paid off from a later credit), holding the whole
    # of what is owed after it, so what a user owes is the newest row (one primary-key read).
    # The primary key is the concurrency check: two transactions changing one user's debts at
    # once collide on the next version, and one of them decides again.
    sa.Column("user_id", ascii_id(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    # The total owed after this row, in the currency of the user's wallet.
    sa.Column("owed_after", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # JSON: each debt still owed, oldest first (campaign, payment, refund, what is owed), the
    # order in which credits pay them off (``rewards.decide.Debts``).
    sa.Column("body", long_text(), nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("owed_after >= 0", name="owed_after_not_negative"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    # Auto-increment ids commit out of order across transactions, so the relay never reads
    # "id > last seen": it reads the rows still present (published rows are deleted).
    sa.Column(
        "outbox_id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("shard", sa.SmallInteger, nullable=False),
    sa.Column("payment_id", BinaryUUID(), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("event_id", BinaryUUID(), nullable=False),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("schema_version", sa.SmallInteger, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("body", long_text(), nullable=False),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("client_id", ascii_id(64), primary_key=True),
    sa.Column("idempotency_key", ascii_id(255), primary_key=True),
    # The normalized request (operation + body) as JSON: compared field by field on reuse.
    sa.Column("request", long_text(), nullable=False),
    sa.Column("response_status", sa.SmallInteger, nullable=False),
    sa.Column("response_body", long_text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False, index=True),
)

relay_leases = sa.Table(
    "relay_leases",
    metadata,
    sa.Column("shard", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
)

admission_settings = sa.Table(
    "admission_settings",
    metadata,
    # One row (setting_id = 1) once an operator changed them live; none: the KESSAI_ADMISSION_*
    # settings apply.
    sa.Column("setting_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("percent", sa.Float, nullable=False),
    sa.Column("window_seconds", sa.Integer, nullable=False),
    sa.Column("without_device", sa.String(16), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("updated_by", sa.String(64), nullable=False),
)


def newest_of(
    stream: sa.Column[str], streams: Collection[str], *columns: sa.ColumnElement[Any]
) -> sa.Select[Any]:
    """``columns`` of the newest row (highest ``version``) of each stream of ``streams`` in
    ``stream``'s table, whose primary key is ``(stream, version)``: a primary-key range per
    stream, however long its history. The read of a wallet's balance, of a campaign's total
    granted, of a user's debts."""
    table = stream.table
    version = table.c.version
    newest = (
        sa.select(stream.label("stream"), sa.func.max(version).label("version"))
        .where(stream.in_(sorted(streams)))
        .group_by(stream)
        .subquery()
    )
    return sa.select(*columns).join(
        newest, sa.and_(stream == newest.c.stream, version == newest.c.version)
    )


def newest_wallet_movements(user_ids: Collection[str]) -> sa.Select[Any]:
    """``(user_id, version, currency, balance_after)`` of the newest movement of each wallet of
    ``user_ids``: its balance (the write path's read of a batch's wallets, and the
    reconciler's)."""
    w = wallet_events.c
    return newest_of(w.user_id, user_ids, w.user_id, w.version, w.currency, w.balance_after)
