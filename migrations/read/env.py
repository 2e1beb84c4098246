"""Alembic environment of the read database. Run through `kessai migrate`."""

from kessai.schema.read import metadata
from migrations.environment import run

run(metadata, version_table="alembic_version_read")
