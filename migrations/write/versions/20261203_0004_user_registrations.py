"""User registrations: one ``UserRegistered`` per user, append-only. Refused by the database: an
UPDATE or DELETE (triggers, as for ``events`` and ``wallet_events``), and a second registration
of one user (the primary key ``user_id``: what makes "registered once" hold across processes).

Revision ID: w0004
Revises: w0003
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id, long_text

revision: str = "w0004"
down_revision: str | None = "w0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_MESSAGE = "user registrations are append-only"


def upgrade() -> None:
    op.create_table(
        "user_registrations",
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("body", long_text(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_registrations")),
        sa.UniqueConstraint("event_id", name=op.f("uq_user_registrations_event_id")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    dialect = op.get_bind().dialect.name
    for action in ("UPDATE", "DELETE"):
        name = f"user_registrations_refuse_{action.lower()}"
        if dialect == "mysql":
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON user_registrations FOR EACH ROW "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY_MESSAGE}'"
            )
        else:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON user_registrations "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
            )


def downgrade() -> None:
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS user_registrations_refuse_{action}")
    op.drop_table("user_registrations")
