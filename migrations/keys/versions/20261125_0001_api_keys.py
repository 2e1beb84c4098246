"""The key store: API keys, stored as the SHA-256 of their secret, with their scopes.

Revision ID: k0001
Revises:
Create Date: 2026-11-25 01:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import kessai.db

revision: str = "k0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", kessai.db.ascii_id(32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("secret_sha256", kessai.db.ascii_id(64), nullable=False),
        sa.Column("scopes", kessai.db.long_text(), nullable=False),
        sa.Column("created_at", kessai.db.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", kessai.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )


def downgrade() -> None:
    op.drop_table("api_keys")
