"""schemathesis against both services' own OpenAPI schemas, over real HTTP (uvicorn), with the
databases on MariaDB and the rate-limit counters in Redis.

Every generated request (valid and invalid ones) must get an answer that matches the schema
documented for it (status, content type and body), and no 5xx but the documented, deliberate
503s of the command API (a card payment with no acquirer configured, admission control).
The number of examples per operation is bounded so the suite stays fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from command_service.app import create_app as create_command_app
from kessai.auth import ADMIN, PAYMENTS_WRITE, USERS_READ, merchant_scope
from kessai.broker import free_port
from kessai.migrate import upgrade
from kessai.settings import Settings
from query_service.app import create_app as create_query_app
from tests import backends
from tests.helpers import UNLIMITED, api_key

EXAMPLES = 25
DELIBERATE_503 = {"acquirer_unavailable", "temporarily_restricted"}


class Server:
    """An app served by uvicorn in a thread of this process, on a free port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, "the server did not start in 20 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def deployment(mysql_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home: Path = tmp_path_factory.mktemp("schemas")
    created = {
        tree: backends.create_mysql_database(mysql_server) for tree in ("write", "read", "keys")
    }
    try:
        for tree, (url, _) in created.items():
            upgrade(tree, url)  # type: ignore[arg-type]
        settings = Settings(
            home=home,
            write_db_url=created["write"][0],
            read_db_url=created["read"][0],
            keys_db_url=created["keys"][0],
            redis_url="redis://127.0.0.1:6379/0",
            rate_limit_per_ip=UNLIMITED,
            rate_limit_writes=UNLIMITED,
            rate_limit_reads=UNLIMITED,
            rate_limit_expensive=UNLIMITED,
        )
        scopes = [PAYMENTS_WRITE, USERS_READ, ADMIN, *(merchant_scope(f"m{i}") for i in range(3))]
        key = api_key(settings, *scopes, name="schemathesis")
        with (
            Server(create_command_app(settings)) as command,
            Server(create_query_app(settings)) as query,
        ):
            yield {"command": command.url, "query": query.url, "key": key}
    finally:
        for _, name in created.values():
            backends.drop_mysql_database(mysql_server, name)


HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def check(case: Any, base_url: str, key: str) -> None:
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    if response.status_code >= 500:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        assert response.status_code == 503, (case.method, case.path, response.text)
        assert code in DELIBERATE_503, (case.method, case.path, response.text)
    case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])
    for leak in ("Traceback", "sqlalchemy", "pymysql"):
        assert leak not in response.text


def fuzz(base_url: str, key: str) -> list[str]:
    """Every operation of the schema served at ``base_url``, with generated requests."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @HYPOTHESIS
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            check(case, base_url, key)

        one()
    return labels


def test_the_command_api_answers_every_request_as_documented(deployment: dict[str, str]) -> None:
    labels = fuzz(deployment["command"], deployment["key"])
    assert "POST /v1/payments" in labels
    assert "PUT /v1/admin/admission" in labels


def test_the_query_api_answers_every_request_as_documented(deployment: dict[str, str]) -> None:
    labels = fuzz(deployment["query"], deployment["key"])
    assert "GET /v1/merchants/{merchant_id}/payments.csv" in labels


def test_both_schemas_are_served_without_a_key(deployment: dict[str, str]) -> None:
    for service in ("command", "query"):
        response = httpx.get(f"{deployment[service]}/openapi.json", timeout=10)
        assert response.status_code == 200
        assert response.json()["paths"]
