"""Wallet streams: each user's wallet its own append-only stream of movements, the newest of
which holds the balance (``balance_after``). Refused by the database: an UPDATE or DELETE
(triggers, as for ``events``), a second movement with the same (user, version) (the primary key:
the optimistic concurrency check), and a balance below zero (a CHECK constraint, beneath the
write path's own check).

Revision ID: w0003
Revises: w0002
Create Date: 2026-12-02 15:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id, long_text

revision: str = "w0003"
down_revision: str | None = "w0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_MESSAGE = "wallet events are append-only"


def upgrade() -> None:
    op.create_table(
        "wallet_events",
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("body", long_text(), nullable=False),
        sa.CheckConstraint(
            "balance_after >= 0", name=op.f("ck_wallet_events_balance_after_not_negative")
        ),
        sa.PrimaryKeyConstraint("user_id", "version", name=op.f("pk_wallet_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_wallet_events_event_id")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    dialect = op.get_bind().dialect.name
    for action in ("UPDATE", "DELETE"):
        name = f"wallet_events_refuse_{action.lower()}"
        if dialect == "mysql":
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON wallet_events FOR EACH ROW "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY_MESSAGE}'"
            )
        else:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON wallet_events "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
            )


def downgrade() -> None:
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS wallet_events_refuse_{action}")
    op.drop_table("wallet_events")
