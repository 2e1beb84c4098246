"""Baseline of the read database; the projection tables arrive with the projector.

Revision ID: r0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

revision: str = "r0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
