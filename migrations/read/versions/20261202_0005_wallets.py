"""Wallets on the read side: each user's balance as the projector last applied it (``wallets``)
and every movement with the balance it left (``wallet_movements``, the statement).

Revision ID: r0005_wallets
Revises: r0004_run_scope
Create Date: 2026-12-02 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id

revision: str = "r0005_wallets"
down_revision: str | None = "r0004_run_scope"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "wallets",
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("stream_id", BinaryUUID(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_wallets")),
        sa.UniqueConstraint("stream_id", name=op.f("uq_wallets_stream_id")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "wallet_movements",
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("payment_id", BinaryUUID(), nullable=True),
        sa.Column("refund_id", BinaryUUID(), nullable=True),
        sa.Column("top_up_id", BinaryUUID(), nullable=True),
        sa.Column("merchant_id", ascii_id(64), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=True),
        sa.Column("reference", sa.String(length=128), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "version", name=op.f("pk_wallet_movements")),
        sa.UniqueConstraint("event_id", name=op.f("uq_wallet_movements_event_id")),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("wallet_movements")
    op.drop_table("wallets")
