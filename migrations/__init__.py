"""Alembic migration trees, one per database: ``write`` and ``read``."""
