"""Alembic environment of the write database. Run through `kessai migrate`."""

from kessai.schema.write import metadata
from migrations.environment import run

run(metadata, version_table="alembic_version_write")
