"""Applying the Alembic trees (one per database) programmatically."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config

import migrations

Tree = Literal["write", "read", "keys"]


def alembic_config(tree: Tree, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent / tree))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option(
        "version_locations", str(Path(migrations.__file__).parent / tree / "versions")
    )
    return cfg


def upgrade(tree: Tree, url: str, revision: str = "head") -> None:
    """Bring the ``tree`` database at ``url`` to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(tree, url), revision)
