"""The read model: payments, refunds, merchant totals by day and hour, merchants, and the
projector's offsets, parked events and dead letters.

Revision ID: r0002
Revises: r0001
Create Date: 2026-11-24 22:45:16.932382
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import kessai.db

revision: str = "r0002"
down_revision: str | None = "r0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Explicit, so a server whose default is latin1 still stores any text; binary collation, so
# string comparisons are exact.
TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column(
            "dead_letter_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("payment_id", kessai.db.BinaryUUID(length=16), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column(
            "raw_key", sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql"), nullable=True
        ),
        sa.Column(
            "raw_value", sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql"), nullable=True
        ),
        sa.Column("headers", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", kessai.db.UTCDateTime(), nullable=False),
        sa.Column("resolved_at", kessai.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("dead_letter_id", name=op.f("pk_dead_letters")),
        **TABLE_OPTIONS,
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dead_letters_payment_id_status"), ["payment_id", "status"], unique=False
        )

    op.create_table(
        "merchant_daily_totals",
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("payments_count", sa.BigInteger(), nullable=False),
        sa.Column("payments_amount", sa.BigInteger(), nullable=False),
        sa.Column("refunds_count", sa.BigInteger(), nullable=False),
        sa.Column("refunds_amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "merchant_id", "day", "currency", name=op.f("pk_merchant_daily_totals")
        ),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "merchant_hourly_totals",
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column("hour", sa.DateTime(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("payments_count", sa.BigInteger(), nullable=False),
        sa.Column("payments_amount", sa.BigInteger(), nullable=False),
        sa.Column("refunds_count", sa.BigInteger(), nullable=False),
        sa.Column("refunds_amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "merchant_id", "hour", "currency", name=op.f("pk_merchant_hourly_totals")
        ),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "merchants",
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("merchant_id", name=op.f("pk_merchants")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "parked_events",
        sa.Column("payment_id", kessai.db.BinaryUUID(length=16), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("body", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("parked_at", kessai.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("payment_id", "version", name=op.f("pk_parked_events")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "payments",
        sa.Column("payment_id", kessai.db.BinaryUUID(length=16), nullable=False),
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column(
            "user_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column("store_id", sa.String(length=64), nullable=True),
        sa.Column("order_ref", sa.String(length=128), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("captured_amount", sa.BigInteger(), nullable=False),
        sa.Column("refunded_amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
        sa.Column("created_at", kessai.db.UTCDateTime(), nullable=False),
        sa.Column("updated_at", kessai.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("payment_id", name=op.f("pk_payments")),
        **TABLE_OPTIONS,
    )
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_payments_merchant_id_created_at_payment_id"),
            ["merchant_id", "created_at", "payment_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_payments_user_id_created_at_payment_id"),
            ["user_id", "created_at", "payment_id"],
            unique=False,
        )

    op.create_table(
        "projector_offsets",
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("last_event_id", sa.String(length=36), nullable=True),
        sa.Column("last_event_at", kessai.db.UTCDateTime(), nullable=True),
        sa.Column("caught_up_at", kessai.db.UTCDateTime(), nullable=True),
        sa.Column("updated_at", kessai.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("topic", "kafka_partition", name=op.f("pk_projector_offsets")),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "refunds",
        sa.Column("payment_id", kessai.db.BinaryUUID(length=16), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("refund_id", kessai.db.BinaryUUID(length=16), nullable=False),
        sa.Column(
            "merchant_id",
            sa.String(length=64).with_variant(
                mysql.VARCHAR(charset="ascii", collation="ascii_bin", length=64), "mysql"
            ),
            nullable=False,
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("created_at", kessai.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("payment_id", "version", name=op.f("pk_refunds")),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("refunds")
    op.drop_table("projector_offsets")
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payments_user_id_created_at_payment_id"))
        batch_op.drop_index(batch_op.f("ix_payments_merchant_id_created_at_payment_id"))

    op.drop_table("payments")
    op.drop_table("parked_events")
    op.drop_table("merchants")
    op.drop_table("merchant_hourly_totals")
    op.drop_table("merchant_daily_totals")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letters_payment_id_status"))

    op.drop_table("dead_letters")
