"""What every database's Alembic ``env.py`` does: the trees differ only in their metadata and
their version table (each database keeps its own, so one server can hold all three)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from kessai.db import create_db_engine


def run(metadata: sa.MetaData, version_table: str) -> None:
    """Run the migrations of the current Alembic invocation, offline or online."""
    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            literal_binds=True,
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection, metadata, version_table)
        return
    engine = create_db_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    try:
        with engine.connect() as conn:
            _run(conn, metadata, version_table)
    finally:
        engine.dispose()


def _run(connection: Any, metadata: sa.MetaData, version_table: str) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
