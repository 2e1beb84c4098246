"""The write store: events (append-only, enforced by triggers), outbox, idempotency keys,
relay leases.

Revision ID: w0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id, long_text

revision: str = "w0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_MESSAGE = "events are append-only"

# Explicit, so a server whose default is latin1 still stores any text; binary collation, so
# string comparisons are exact.
TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("payment_id", BinaryUUID(), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("event_type", sa.String(40), nullable=False),
        sa.Column("schema_version", sa.SmallInteger, nullable=False),
        sa.Column("merchant_id", ascii_id(64), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("body", long_text(), nullable=False),
        sa.PrimaryKeyConstraint("payment_id", "version", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "outbox",
        sa.Column(
            "outbox_id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            nullable=False,
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
        sa.PrimaryKeyConstraint("outbox_id", name="pk_outbox"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("client_id", ascii_id(64), nullable=False),
        sa.Column("idempotency_key", ascii_id(255), nullable=False),
        sa.Column("request", long_text(), nullable=False),
        sa.Column("response_status", sa.SmallInteger, nullable=False),
        sa.Column("response_body", long_text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "idempotency_key", name="pk_idempotency_keys"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])
    op.create_table(
        "relay_leases",
        sa.Column("shard", sa.SmallInteger, nullable=False, autoincrement=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("shard", name="pk_relay_leases"),
        **TABLE_OPTIONS,
    )

    dialect = op.get_bind().dialect.name
    for action in ("UPDATE", "DELETE"):
        name = f"events_refuse_{action.lower()}"
        if dialect == "mysql":
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON events FOR EACH ROW "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY_MESSAGE}'"
            )
        else:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON events "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
            )


def downgrade() -> None:
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS events_refuse_{action}")
    op.drop_table("relay_leases")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("outbox")
    op.drop_table("events")
