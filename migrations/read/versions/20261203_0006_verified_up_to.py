"""How far each check of the reconciler is verified: ``reconciler_state.verified_up_to`` (per
check, the instant up to which everything it covers is known consistent, from the beginning of
the ledger) and ``reconciliation_runs.checks`` (what each run concluded per check). Both JSON;
NULL before: no check verified yet (the next full audit verifies them), no run's checks known.

Revision ID: r0006_verified_up_to
Revises: r0005_wallets
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "r0006_verified_up_to"
down_revision: str | None = "r0005_wallets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "reconciler_state", sa.Column("verified_up_to", sa.JSON(none_as_null=True), nullable=True)
    )
    op.add_column(
        "reconciliation_runs", sa.Column("checks", sa.JSON(none_as_null=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("reconciliation_runs") as batch:
        batch.drop_column("checks")
    with op.batch_alter_table("reconciler_state") as batch:
        batch.drop_column("verified_up_to")
