"""What users owe campaigns: ``reward_debts``, one row per change of a user's debts (a refund's
cashback the wallet could not give back in full, a debt paid off from a later credit), holding
the total owed after it and the debts still open, oldest first. Append-only: the database
refuses an UPDATE or DELETE (triggers, as for ``reward_grants``), and a total owed below zero
(a CHECK constraint).

Revision ID: w0006
Revises: w0005
Create Date: 2026-12-03 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import UTCDateTime, ascii_id, long_text

revision: str = "w0006"
down_revision: str | None = "w0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "reward_debts"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("owed_after", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("body", long_text(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("owed_after >= 0", name=op.f("ck_reward_debts_owed_after_not_negative")),
        sa.PrimaryKeyConstraint("user_id", "version", name=op.f("pk_reward_debts")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    dialect = op.get_bind().dialect.name
    for action in ("UPDATE", "DELETE"):
        name = f"{TABLE}_refuse_{action.lower()}"
        message = "reward debts are append-only"
        if dialect == "mysql":
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON {TABLE} FOR EACH ROW "
                f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'"
            )
        else:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )


def downgrade() -> None:
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_refuse_{action}")
    op.drop_table(TABLE)
