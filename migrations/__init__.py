"""Alembic migration trees, one per database (``write``, ``read``, ``keys``), and applying
them programmatically (``kessai migrate``, ``kessai up``, the tests and the benches).

Here rather than in the core: the core (``kessai``) imports nothing above it, and the trees'
environments import the core's table definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config

Tree = Literal["write", "read", "keys"]

_TREES = Path(__file__).parent


def alembic_config(tree: Tree, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_TREES / tree))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(_TREES / tree / "versions"))
    return cfg


def upgrade(tree: Tree, url: str, revision: str = "head") -> None:
    """Bring the ``tree`` database at ``url`` to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(tree, url), revision)
