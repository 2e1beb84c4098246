"""Campaigns and their grants: ``campaign_events`` (each campaign's stream), ``campaign_budget``
(what each campaign has granted, one row per batch of grants) and ``reward_grants`` (one row per
grant or take-back, whose primary key grants a payment or a registration at most once per
campaign). All append-only: the database refuses an UPDATE or DELETE (triggers, as for
``events``), and a total granted below zero (a CHECK constraint).

Revision ID: w0005
Revises: w0004
Create Date: 2026-12-03 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kessai.db import BinaryUUID, UTCDateTime, ascii_id, long_text

revision: str = "w0005"
down_revision: str | None = "w0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("campaign_events", "campaign_budget", "reward_grants")


def upgrade() -> None:
    op.create_table(
        "campaign_events",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("body", long_text(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "version", name=op.f("pk_campaign_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_campaign_events_event_id")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_table(
        "campaign_budget",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("grants", sa.Integer(), nullable=False),
        sa.Column("granted_after", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "granted_after >= 0", name=op.f("ck_campaign_budget_granted_after_not_negative")
        ),
        sa.PrimaryKeyConstraint("campaign_id", "version", name=op.f("pk_campaign_budget")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_table(
        "reward_grants",
        sa.Column("campaign_id", ascii_id(64), nullable=False),
        sa.Column("user_id", ascii_id(64), nullable=False),
        sa.Column("period", ascii_id(7), nullable=False),
        sa.Column("grant_key", ascii_id(80), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("event_id", BinaryUUID(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "campaign_id", "user_id", "period", "grant_key", name=op.f("pk_reward_grants")
        ),
        sa.UniqueConstraint("event_id", name=op.f("uq_reward_grants_event_id")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    dialect = op.get_bind().dialect.name
    for table in TABLES:
        message = f"{table.replace('_', ' ')} are append-only"
        for action in ("UPDATE", "DELETE"):
            name = f"{table}_refuse_{action.lower()}"
            if dialect == "mysql":
                op.execute(
                    f"CREATE TRIGGER {name} BEFORE {action} ON {table} FOR EACH ROW "
                    f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'"
                )
            else:
                op.execute(
                    f"CREATE TRIGGER {name} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
                )


def downgrade() -> None:
    for table in reversed(TABLES):
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_refuse_{action}")
        op.drop_table(table)
