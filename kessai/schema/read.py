"""The read database: denormalized tables shaped for the merchant dashboard, the projector's
own bookkeeping (offsets, parked events, dead letters), and the reconciler's (its runs, their
findings, its state).

The projector writes the read model and its bookkeeping, the reconciler its own tables (and,
to repair drift, read rows under the projector's offset locks); the query service reads through
a read-only connection.
Every index serves a named query of the query service and nothing else:

- ``ix_payments_merchant_id_created_at_payment_id``: a merchant's payments, newest first
  (list, CSV), keyset-paged on ``(created_at, payment_id)``;
- ``ix_payments_user_id_created_at_payment_id``: a user's own history;
- ``wallet_movements``' primary key ``(user_id, version)``: a user's statement, newest first;
- the totals' primary keys: a merchant's summary over a range of days or hours;
- ``campaigns``' primary key: the campaigns, by id; ``campaign_minute_totals``' primary key
  ``(campaign_id, minute)``: a campaign's grants in the last hour.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from kessai.db import NAMING_CONVENTION, BinaryUUID, UTCDateTime, ascii_id, long_text

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _blob() -> sa.types.TypeEngine[bytes]:
    return sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql")


payments = sa.Table(
    "payments",
    metadata,
    sa.Column("payment_id", BinaryUUID(), primary_key=True),
    sa.Column("merchant_id", ascii_id(64), nullable=False),
    sa.Column("user_id", ascii_id(64), nullable=False),
    sa.Column("store_id", sa.String(64), nullable=True),
    sa.Column("order_ref", sa.String(128), nullable=True),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # Money in minor units of `currency`.
    sa.Column("captured_amount", sa.BigInteger, nullable=False),
    sa.Column("refunded_amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("metadata", long_text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index(None, "merchant_id", "created_at", "payment_id"),
    sa.Index(None, "user_id", "created_at", "payment_id"),
)

refunds = sa.Table(
    "refunds",
    metadata,
    sa.Column("payment_id", BinaryUUID(), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("refund_id", BinaryUUID(), nullable=False),
    sa.Column("merchant_id", ascii_id(64), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("reason", sa.String(500), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)


def _totals(name: str, bucket: sa.Column[object]) -> sa.Table:
    # Key order (merchant, bucket, currency): a summary is one range scan over the buckets.
    return sa.Table(
        name,
        metadata,
        sa.Column("merchant_id", ascii_id(64), primary_key=True),
        bucket,
        sa.Column("currency", sa.String(3), primary_key=True),
        sa.Column("payments_count", sa.BigInteger, nullable=False),
        sa.Column("payments_amount", sa.BigInteger, nullable=False),
        sa.Column("refunds_count", sa.BigInteger, nullable=False),
        sa.Column("refunds_amount", sa.BigInteger, nullable=False),
    )


# Buckets are local to the merchant's time zone: `day` is its calendar date, `hour` the naive
# local start of the hour. A payment counts in the bucket of its capture, a refund in its own.
merchant_daily_totals = _totals(
    "merchant_daily_totals", sa.Column("day", sa.Date, primary_key=True)
)
merchant_hourly_totals = _totals(
    "merchant_hourly_totals", sa.Column("hour", sa.DateTime, primary_key=True)
)

merchants = sa.Table(
    "merchants",
    metadata,
    sa.Column("merchant_id", ascii_id(64), primary_key=True),
    sa.Column("time_zone", sa.String(64), nullable=False),
)

# -- wallets ---------------------------------------------------------------------------------
# A user's wallet as its stream (kessai/events.py, the wallet events) left it: the balance of
# its newest movement, and every movement for the statement. Written by the projector only.

wallets = sa.Table(
    "wallets",
    metadata,
    sa.Column("user_id", ascii_id(64), primary_key=True),
    # wallet_stream_id(user_id): the wallet's Kafka key, by which a batch finds the rows of the
    # wallets its records touch (and their parked events and dead letters) without parsing.
    sa.Column("stream_id", BinaryUUID(), nullable=False, unique=True),
    sa.Column("currency", sa.String(3), nullable=False),
    # Money in minor units of `currency`: the balance after the newest movement, never < 0.
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # When the newest movement happened.
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

wallet_movements = sa.Table(
    "wallet_movements",
    metadata,
    sa.Column("user_id", ascii_id(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", BinaryUUID(), nullable=False, unique=True),
    # "top_up", "payment", "refund" or "reward" (kessai.wallets.MovementKind).
    sa.Column("kind", sa.String(16), nullable=False),
    # Signed, in minor units: positive into the wallet (top-up, refund), negative out of it.
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    # What the movement belongs to: a payment (and its refund) at a merchant, or a top-up.
    sa.Column("payment_id", BinaryUUID(), nullable=True),
    sa.Column("refund_id", BinaryUUID(), nullable=True),
    sa.Column("top_up_id", BinaryUUID(), nullable=True),
    sa.Column("merchant_id", ascii_id(64), nullable=True),
    sa.Column("source", sa.String(32), nullable=True),
    sa.Column("reference", sa.String(128), nullable=True),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    # The campaign a grant (``reward``) comes from; NULL for every other movement.
    sa.Column("campaign_id", ascii_id(64), nullable=True),
)

# -- campaigns -------------------------------------------------------------------------------
# Each campaign as its stream (kessai/campaigns.py) left it, and what its grants (``RewardGranted``
# on the users' wallet streams) add up to: in all, and per minute for "the last hour". Written by
# the projector only; the figures in the same batch transaction as the grants' statement lines.

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    # campaign_stream_id(campaign_id): the campaign's Kafka key, by which a batch finds the rows
    # of the campaigns its records touch, as ``wallets.stream_id``.
    sa.Column("stream_id", BinaryUUID(), nullable=False, unique=True),
    # "cashback" or "welcome_bonus".
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # Money in minor units of `currency`: the most the campaign ever grants.
    sa.Column("budget", sa.BigInteger, nullable=False),
    sa.Column("starts_at", UTCDateTime(), nullable=False),
    sa.Column("ends_at", UTCDateTime(), nullable=False),
    sa.Column("time_zone", sa.String(64), nullable=False),
    # The rules as the campaign's events left them (kessai.campaigns.CashbackRules or
    # WelcomeBonusRules, their JSON form).
    sa.Column("rules", long_text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("stopped_at", UTCDateTime(), nullable=True),
    sa.Column("exhausted_at", UTCDateTime(), nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    # When its newest event happened.
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

campaign_totals = sa.Table(
    "campaign_totals",
    metadata,
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    # Every grant so far, in minor units of the campaign's currency, and how many.
    sa.Column("granted_amount", sa.BigInteger, nullable=False),
    sa.Column("grants_count", sa.BigInteger, nullable=False),
)

campaign_minute_totals = sa.Table(
    "campaign_minute_totals",
    metadata,
    sa.Column("campaign_id", ascii_id(64), primary_key=True),
    # The start of the minute (UTC) the grants happened in: the last hour is a range of at
    # most 61 rows of the primary key.
    sa.Column("minute", UTCDateTime(), primary_key=True),
    sa.Column("granted_amount", sa.BigInteger, nullable=False),
    sa.Column("grants_count", sa.BigInteger, nullable=False),
)

projector_offsets = sa.Table(
    "projector_offsets",
    metadata,
    sa.Column("topic", sa.String(249), primary_key=True),
    sa.Column("kafka_partition", sa.Integer, primary_key=True, autoincrement=False),
    # The offset of the next record to apply: stored in the same transaction as its effects.
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    # event_id of the record at next_offset - 1: if the log there holds another record, the
    # broker lost its log (the embedded broker does on restart) and the offsets mean nothing.
    sa.Column("last_event_id", sa.String(36), nullable=True),
    # recorded_at of the last applied event, and when the projector last saw itself at the
    # end of this partition: together they say how fresh the read side is.
    sa.Column("last_event_at", UTCDateTime(), nullable=True),
    sa.Column("caught_up_at", UTCDateTime(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

parked_events = sa.Table(
    "parked_events",
    metadata,
    sa.Column("payment_id", BinaryUUID(), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    # "gap": an earlier version is missing; "blocked": an earlier version is a dead letter.
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("body", long_text(), nullable=False),
    sa.Column("topic", sa.String(249), nullable=False),
    sa.Column("kafka_partition", sa.Integer, nullable=False),
    sa.Column("kafka_offset", sa.BigInteger, nullable=False),
    sa.Column("parked_at", UTCDateTime(), nullable=False),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column(
        "dead_letter_id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("payment_id", BinaryUUID(), nullable=True),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("topic", sa.String(249), nullable=False),
    sa.Column("kafka_partition", sa.Integer, nullable=False),
    sa.Column("kafka_offset", sa.BigInteger, nullable=False),
    sa.Column("raw_key", _blob(), nullable=True),
    sa.Column("raw_value", _blob(), nullable=True),
    sa.Column("headers", long_text(), nullable=False),
    sa.Column("reason", sa.String(1000), nullable=False),
    # "open" blocks the payment's later events; "resolved" once retried or superseded.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("resolved_at", UTCDateTime(), nullable=True),
    sa.Index(None, "payment_id", "status"),
)

# -- the reconciler's records ----------------------------------------------------------------

RECONCILER_CHECKS = (
    "payments",
    "totals",
    "trial_balance",
    "wallet_chain",
    "wallet_movement",
    "wallet_balance",
    "grants",
)
"""The checks of a reconciliation run, each verified up to an instant of its own: the payments'
rows, parked events, dead letters and orphans against the events; the merchant totals; the
trial balance; each wallet's chain; each payment's wallet movement; the wallets' balances; the
campaigns' budgets against their grants, and every eligible payment's grant."""


def moment_text(moment: datetime) -> str:
    """An instant as the reconciler's JSON columns hold it: UTC, milliseconds, ``Z``."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def moment_of(text: str | None) -> datetime | None:
    """``moment_text`` read back (None stays None: never verified)."""
    return None if text is None else datetime.fromisoformat(text)


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True)


reconciliation_runs = sa.Table(
    "reconciliation_runs",
    metadata,
    sa.Column(
        "run_id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    # "full" or "incremental".
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    # UUIDv7 bounds (event_id form): the run checked payments with events at or after
    # watermark_from minus the safety margin; watermark_to is what the next run starts from.
    sa.Column("watermark_from", sa.String(36), nullable=True),
    sa.Column("watermark_to", sa.String(36), nullable=True),
    sa.Column("payments_checked", sa.BigInteger, nullable=False),
    sa.Column("findings_count", sa.Integer, nullable=False),
    sa.Column("repaired_count", sa.Integer, nullable=False),
    # "consistent", "drift" or "failed"; NULL while the run is in progress.
    sa.Column("outcome", sa.String(16), nullable=True),
    sa.Column("error", sa.String(2000), nullable=True),
    # What the run checked: "everything", or "events recorded after <UTC time>" (an
    # incremental run: consistent means consistent within that). NULL for older runs.
    sa.Column("scope", sa.String(64), nullable=True),
    # What the run concluded per check (RECONCILER_CHECKS): {check: {"findings": n,
    # "unrepaired": n, "verified_up_to": moment_text or null}}. NULL for runs that did not
    # complete and for runs recorded before checks were.
    sa.Column("checks", _json(), nullable=True),
)

reconciliation_findings = sa.Table(
    "reconciliation_findings",
    metadata,
    sa.Column("run_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payment_id", BinaryUUID(), nullable=True),
    sa.Column("merchant_id", ascii_id(64), nullable=True),
    sa.Column("details", long_text(), nullable=False),
    sa.Column("repaired", sa.Boolean, nullable=False),
)

reconciler_state = sa.Table(
    "reconciler_state",
    metadata,
    # Always 1: a single row.
    sa.Column("state_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    # Where the next incremental run starts (UUIDv7 bound, event_id form).
    sa.Column("watermark", sa.String(36), nullable=True),
    # Per check (RECONCILER_CHECKS), the instant up to which everything it covers is known
    # consistent, contiguously from the beginning of the ledger: {check: moment_text or null}.
    # NULL (or a check left out): never verified.
    sa.Column("verified_up_to", _json(), nullable=True),
    # One run at a time across instances: the holder and until when.
    sa.Column("lock_owner", sa.String(128), nullable=True),
    sa.Column("lock_expires_at", UTCDateTime(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)
