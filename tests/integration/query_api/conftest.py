"""Fixtures of the query API tests: a migrated read database on each backend, a writer that
fills it as the projector does, and the API in process in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from tests.integration.query_api.helpers import query_settings, read_db_writer, running
from tests.integration.read_model import migrated_read_db


@pytest.fixture(params=["sqlite", "mysql"])
def read_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty read database: a SQLite file, or a fresh MySQL database."""
    server = request.getfixturevalue("mysql_server") if request.param == "mysql" else None
    with migrated_read_db(request.param, tmp_path, server) as url:
        yield url


@pytest.fixture
def sqlite_read_db_url(tmp_path: Path) -> Iterator[str]:
    with migrated_read_db("sqlite", tmp_path, None) as url:
        yield url


@pytest.fixture
def mysql_read_db_url(mysql_server: str, tmp_path: Path) -> Iterator[str]:
    with migrated_read_db("mysql", tmp_path, mysql_server) as url:
        yield url


@pytest.fixture
def writer(read_db_url: str) -> Iterator[Engine]:
    """Writes the read database as the projector does (the query API never can)."""
    yield from read_db_writer(read_db_url)


@pytest.fixture
async def api(read_db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(query_settings(read_db_url, tmp_path)) as (_, client):
        yield client
