"""Fixtures shared by the suite: real databases (SQLite file, MySQL/MariaDB), a real broker.

Every database test runs twice, on SQLite and on MySQL (the local MariaDB, or a MySQL container
when ``KESSAI_TEST_BACKEND`` selects containers; see ``tests/backends.py``). Each test gets its
own freshly migrated database and its own Kafka topic, so tests never see each other's data.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE
from kessai.broker import EmbeddedBroker, free_port
from kessai.db import create_db_engine
from kessai.money import MAX_AMOUNT
from kessai.settings import Settings
from migrations import Tree, upgrade
from tests import backends
from tests.helpers import PAYER, UNBOUNDED_IN_FLIGHT, UNLIMITED, api_key, bearer, fund
from tests.ledger_check import ledger_problems


def pytest_report_header(config: pytest.Config) -> str:
    return f"kessai test backend: {backends.selected_backend()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """schemathesis makes one item per API operation (``test[POST /v1/payments]``), but under
    pytest 9.2 their node ids all read ``test``, without the operation; pytest-xdist keys items
    by node id, so ``make test`` ran one operation per schema test and silently dropped the
    others (683 collected, 671 run). Each item gets its operation back in its id."""
    for item in items:
        label = getattr(item, "operation_label", None)  # schemathesis's items only
        if isinstance(label, str) and item.id.params is None:
            item._id = item.id.with_params(label)  # no public setter for a node id


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[str]:
    url, stop = backends.start_mysql()
    yield url
    stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    started = backends.start_kafka()
    if started is not None:
        bootstrap, stop = started
        yield bootstrap
        stop()
        return
    with EmbeddedBroker(free_port()) as broker:
        yield broker.bootstrap


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (append them): killed at its end if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of a test: every database test runs on both."""
    return str(request.param)


def _migrated_database(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, tree: Tree
) -> Iterator[str]:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / f'{tree}.db'}"
        upgrade(tree, url)
        yield url
        _check_ledger(request, tree, url)
        return
    server = request.getfixturevalue("mysql_server")
    url, name = backends.create_mysql_database(server)
    try:
        upgrade(tree, url)
        yield url
        _check_ledger(request, tree, url)
    finally:
        backends.drop_mysql_database(server, name)


def _check_ledger(request: pytest.FixtureRequest, tree: Tree, url: str) -> None:
    """Every test that wrote money leaves a balanced ledger (tests/ledger_check.py), except
    one that says it breaks it on purpose (``@pytest.mark.breaks_the_ledger``)."""
    if tree == "write" and request.node.get_closest_marker("breaks_the_ledger") is None:
        problems = ledger_problems(url)
        assert not problems, "the write store's postings do not balance:\n" + "\n".join(
            problems[:20]
        )


@pytest.fixture
def write_db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty write store: a SQLite file, or a fresh MySQL database."""
    yield from _migrated_database(request, backend, tmp_path, "write")


@pytest.fixture
def read_db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty read database on the same backend as the write store."""
    yield from _migrated_database(request, backend, tmp_path, "read")


@pytest.fixture
def topic() -> str:
    return f"kessai.test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(write_db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        write_db_url=write_db_url,
        read_db_url=f"sqlite:///{tmp_path / 'read.db'}",
        kafka_bootstrap=kafka_bootstrap,
        topic=topic,
        topic_partitions=4,
        # Groups of earlier tests' projectors must not delay this test's rebalances.
        projector_group_id=f"kessai-projector-{topic}",
        relay_poll_interval_ms=10,
        relay_lease_seconds=3.0,
        relay_retry_max_backoff_ms=300,
        kafka_request_timeout_ms=5_000,
        # Tests drive the APIs far faster than any one client should: limits are tested alone.
        rate_limit_per_ip=UNLIMITED,
        rate_limit_writes=UNLIMITED,
        rate_limit_reads=UNLIMITED,
        rate_limit_expensive=UNLIMITED,
        overload_max_in_flight=UNBOUNDED_IN_FLIGHT,
        # Tests top wallets up far past what one should hold: the limit is tested alone.
        wallet_max_balance=MAX_AMOUNT,
    )


@pytest.fixture
def pipeline_settings(settings: Settings, read_db_url: str) -> Settings:
    """Settings for tests of the whole pipeline: write store and read DB on one backend."""
    return settings.model_copy(update={"read_db_url": read_db_url})


@pytest.fixture
def read_engine(pipeline_settings: Settings) -> Iterator[Engine]:
    engine = create_db_engine(pipeline_settings.resolved_read_db_url(), pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture
def write_engine(settings: Settings) -> Iterator[Engine]:
    engine = create_db_engine(settings.resolved_write_db_url(), pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The command API in process (real app, real database) behind an HTTP client that sends
    a key with the ``payments:write`` scope; ``payment_body``'s payer (``user-1``) starts with
    a funded wallet (``fund``)."""
    fund(settings, PAYER)
    app = create_app(settings)
    key = api_key(settings, PAYMENTS_WRITE)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(key),
        ) as client,
    ):
        yield client
