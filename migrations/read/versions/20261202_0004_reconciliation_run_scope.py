"""What each reconciliation run checked: ``reconciliation_runs.scope`` ("everything", or "events
recorded after <UTC time>" for an incremental run). Runs recorded before have none.

Revision ID: r0004_run_scope
Revises: r0003
Create Date: 2026-12-02 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0004_run_scope"
down_revision: str | None = "r0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("reconciliation_runs", sa.Column("scope", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reconciliation_runs") as batch:
        batch.drop_column("scope")
