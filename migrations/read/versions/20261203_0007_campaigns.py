"""Campaigns on the read side: each campaign as its stream left it (``campaigns``), what its
grants add up to (``campaign_totals``) and per minute (``campaign_minute_totals``, for the last
hour), and the campaign of each grant in a user's statement (``wallet_movements.campaign_id``,
NULL for every other movement and for the lines written before).

Revision ID: r0007_campaigns
Revises: r0006_verified_up_to
Create Date: 2026-12-03 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id, long_text

revision: str = "r0007_campaigns"
down_revision: str | None = "r0006_verified_up_to"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.add_column("wallet_movements", sa.Column("campaign_id", ascii_id(64), nullable=True))
    op.create_table(
        "campaigns",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("stream_id", BinaryUUID(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("budget", sa.BigInteger(), nullable=False),
        sa.Column("starts_at", UTCDateTime(), nullable=False),
        sa.Column("ends_at", UTCDateTime(), nullable=False),
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.Column("rules", long_text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.Column("exhausted_at", UTCDateTime(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("stream_id", name=op.f("uq_campaigns_stream_id")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "campaign_totals",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("granted_amount", sa.BigInteger(), nullable=False),
        sa.Column("grants_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", name=op.f("pk_campaign_totals")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "campaign_minute_totals",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("minute", UTCDateTime(), nullable=False),
        sa.Column("granted_amount", sa.BigInteger(), nullable=False),
        sa.Column("grants_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "minute", name=op.f("pk_campaign_minute_totals")),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("campaign_minute_totals")
    op.drop_table("campaign_totals")
    op.drop_table("campaigns")
    with op.batch_alter_table("wallet_movements") as batch:
        batch.drop_column("campaign_id")
