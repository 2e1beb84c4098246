"""The reconciler's records: its runs, their findings, and its single state row (watermark and
the lock that keeps one run at a time across instances).

Revision ID: r0003
Revises: r0002
Create Date: 2026-11-24 23:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import kessai.db

revision: str = "r0003"
down_revision: str | None = "r0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "reconciliation_runs",
        sa.Column(
            "run_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("started_at", kessai.db.UTCDateTime(), nullable=False),
        sa.Column("finished_at", kessai.db.UTCDateTime(), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("watermark_from", sa.String(length=36), nullable=True),
        sa.Column("watermark_to", sa.String(length=36), nullable=True),
        sa.Column("payments_checked", sa.BigInteger(), nullable=False),
        sa.Column("findings_count", sa.Integer(), nullable=False),
        sa.Column("repaired_count", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_reconciliation_runs")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "reconciliation_findings",
        sa.Column("run_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payment_id", kessai.db.BinaryUUID(length=16), nullable=True),
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=True,
        ),
        sa.Column("details", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
        sa.Column("repaired", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "seq", name=op.f("pk_reconciliation_findings")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "reconciler_state",
        sa.Column("state_id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("watermark", sa.String(length=36), nullable=True),
        sa.Column("lock_owner", sa.String(length=128), nullable=True),
        sa.Column("lock_expires_at", kessai.db.UTCDateTime(), nullable=True),
        sa.Column("updated_at", kessai.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("state_id", name=op.f("pk_reconciler_state")),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("reconciler_state")
    op.drop_table("reconciliation_findings")
    op.drop_table("reconciliation_runs")
