"""Alembic environment of the key store. Run through `kessai migrate`."""

from kessai.schema.keys import metadata
from migrations.environment import run

run(metadata, version_table="alembic_version_keys")
