"""schemathesis against both services' own OpenAPI documents, over real HTTP (uvicorn), with the
databases on MariaDB, the rate-limit counters in Redis and a card acquirer that approves.

Every check schemathesis has runs (``st run --checks all``): no 5xx, every status, header,
content type and body as documented, schema-valid requests accepted and schema-violating ones
refused, 405 with an ``Allow`` that lists the path's methods, the key enforced where security is
declared. Then the stateful phase follows the documents' links (a payment to its refunds, a page
to its next page and to its payments). Examples and steps are bounded so both APIs take well
under a minute together.

What a schema cannot say, and is therefore not held against "schema-valid requests are
accepted": whether a cursor is one this API issued (``invalid_cursor``), whether a range spans
more buckets than a summary may have (``range_too_large``), whether ``to`` is after ``from``
(a ``validation_error`` of type ``range_empty``), and an integer written as a float
(``"amount": 1200.0``, refused on purpose, though to a JSON Schema validator it is the integer
1200). Idempotency keys are made unique per request, as a client makes them; replays are tested
in ``test_command_api.py``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, Response
from schemathesis.specs.openapi.checks import positive_data_acceptance

from command_service.app import create_app as create_command_app
from kessai.auth import ADMIN, PAYMENTS_WRITE, USERS_READ, merchant_scope
from kessai.broker import free_port
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.settings import Settings
from migrations import upgrade
from query_service.app import create_app as create_query_app
from tests import backends
from tests.helpers import UNLIMITED, api_key, bearer
from tests.integration.read_model import captured, project, refunded
from tests.integration.test_acquirer import AcquirerDouble

EXAMPLES = 15
"""Generated requests per operation in the fuzzing phase (the coverage phase adds its own)."""
STATEFUL_SCENARIOS = 15
STATEFUL_STEPS = 6
MERCHANT = "m0"
"""The merchant the key reads and the read database holds payments of: merchant routes are
tested on it (any other merchant is a 404 before anything else is looked at)."""
LEAKS = ("Traceback", "sqlalchemy", "pymysql")
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
SEMANTIC_REFUSALS = {"invalid_cursor", "range_too_large"}
SEMANTIC_VALIDATION_ERRORS = {"range_empty"}


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


def seed_read_side(read_db_url: str) -> None:
    """A few payments of ``MERCHANT`` in the read database, one refunded, so the query API's
    pages, details and cursors have something real to show."""
    now = utcnow()
    engine = create_db_engine(read_db_url, pool_size=1)
    try:
        events: list[Any] = []
        for i in range(5):
            payment = captured(
                at=now - timedelta(minutes=10 - i), merchant_id=MERCHANT, user_id=f"user-{i % 2}"
            )
            events.append(payment)
            if i == 0:
                events.append(refunded(payment, at=now - timedelta(minutes=1), amount=100))
        project(engine, events)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def deployment(mysql_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home: Path = tmp_path_factory.mktemp("schemas")
    created = {
        tree: backends.create_mysql_database(mysql_server) for tree in ("write", "read", "keys")
    }
    acquirer = AcquirerDouble()
    acquirer.start()
    try:
        for tree, (url, _) in created.items():
            upgrade(tree, url)  # type: ignore[arg-type]
        seed_read_side(created["read"][0])
        settings = Settings(
            home=home,
            write_db_url=created["write"][0],
            read_db_url=created["read"][0],
            keys_db_url=created["keys"][0],
            redis_url="redis://127.0.0.1:6379/0",
            acquirer_url=acquirer.url,
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
        acquirer.stop()
        for _, name in created.values():
            backends.drop_mysql_database(mysql_server, name)


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261202,
        "parameters": {"merchant_id": MERCHANT},
        "request-timeout": 30,
        "suppress-health-check": ["all"],
        # The key is sent with every request (``bearer``), so requests generated without it
        # would be sent with it after all; ``ignored_auth`` still probes each operation without
        # a key and with a wrong one.
        "generation": {
            "max-examples": EXAMPLES,
            "database": "none",
            "with-security-parameters": False,
        },
    }
)
"""As ``st run --checks all`` runs (every check is on by default), with merchant routes on
``MERCHANT``. The key and the server's address come per call: the servers start in a fixture.
The documents are each app's own (``app.openapi()``), exactly what ``/openapi.json`` serves."""
DOCUMENTED = Settings(keys_db_url="sqlite://")
"""Settings to build the apps whose documents are read (no database is opened for that)."""
DOCUMENTS = {
    "command": json.loads(json.dumps(create_command_app(DOCUMENTED).openapi())),
    "query": json.loads(json.dumps(create_query_app(DOCUMENTED).openapi())),
}
"""Each app's document as ``/openapi.json`` serves it."""
command_schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENTS["command"]), config=CONFIG)
query_schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENTS["query"]), config=CONFIG)


def _integers_written_as_floats(case: Case) -> set[str]:
    """Body fields sent as a float without a fraction (``1200.0``)."""
    body = case.body if isinstance(case.body, dict) else {}
    return {name for name, v in body.items() if isinstance(v, float) and v.is_integer()}


def _inexpressible(response: Response, case: Case) -> bool:
    """Whether the refusal is one no OpenAPI document can express (see the module docstring)."""
    try:
        error = response.json()["error"]
        if error["code"] != "validation_error":
            return error["code"] in SEMANTIC_REFUSALS
        floats = _integers_written_as_floats(case)
        return bool(error["details"]["errors"]) and all(
            e["type"] in SEMANTIC_VALIDATION_ERRORS
            or (e["type"] == "int_type" and e["field"] in floats)
            for e in error["details"]["errors"]
        )
    except (ValueError, KeyError, TypeError):
        return False


def accepted_unless_semantic(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis' "schema-valid requests are accepted", but for the refusals no schema can
    express."""
    if response.status_code in (400, 422) and _inexpressible(response, case):
        return None
    return positive_data_acceptance(ctx, response, case)  # type: ignore[no-any-return]


CHECKS: dict[str, Any] = {
    "excluded_checks": [positive_data_acceptance],
    "additional_checks": [accepted_unless_semantic],
}


def fresh_idempotency_key(case: Case) -> None:
    """A well-formed Idempotency-Key becomes a new one: each generated request is a new intended
    write, as a client sends it. (A malformed or missing key is left as generated.)"""
    headers = case.headers or {}
    for name in list(headers):
        value = headers[name]
        if (
            name.lower() == "idempotency-key"
            and isinstance(value, str)
            and IDEMPOTENCY_KEY.fullmatch(value)
        ):
            headers[name] = f"st-{uuid.uuid4().hex}"


def call_and_check(case: Case, base_url: str, key: str) -> None:
    fresh_idempotency_key(case)
    response = case.call_and_validate(base_url=base_url, headers=bearer(key), **CHECKS)
    for leak in LEAKS:
        assert leak not in response.text, leak


@command_schema.parametrize()
def test_the_command_api_answers_every_request_as_documented(
    case: Case, deployment: dict[str, str]
) -> None:
    call_and_check(case, deployment["command"], deployment["key"])


@query_schema.parametrize()
def test_the_query_api_answers_every_request_as_documented(
    case: Case, deployment: dict[str, str]
) -> None:
    call_and_check(case, deployment["query"], deployment["key"])


STATEFUL = settings(
    max_examples=STATEFUL_SCENARIOS,
    stateful_step_count=STATEFUL_STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def run_stateful(schema: Any, base_url: str, key: str) -> None:
    """The stateful phase: sequences of calls that follow the document's links."""
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: Case) -> None:
            fresh_idempotency_key(case)

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": base_url, "headers": bearer(key)}

        def validate_response(
            self, response: Response, case: Case, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            for leak in LEAKS:
                assert leak not in response.text, leak
            case.validate_response(
                response, headers=bearer(key), transport_kwargs=kwargs or None, **CHECKS
            )

    Workflow.run(settings=STATEFUL)


def test_payments_and_their_refunds_in_sequence_stay_as_documented(
    deployment: dict[str, str],
) -> None:
    run_stateful(command_schema, deployment["command"], deployment["key"])


def test_pages_and_their_payments_in_sequence_stay_as_documented(
    deployment: dict[str, str],
) -> None:
    run_stateful(query_schema, deployment["query"], deployment["key"])


def test_both_schemas_are_served_without_a_key(deployment: dict[str, str]) -> None:
    """The documents tested above are the ones the running services serve."""
    for service, document in DOCUMENTS.items():
        response = httpx.get(f"{deployment[service]}/openapi.json", timeout=10)
        assert response.status_code == 200
        assert response.json() == document


def test_a_405_names_every_method_of_the_path(deployment: dict[str, str]) -> None:
    """GET and PUT of the admission policy are two routes on one path: `Allow` names both."""
    for url, allowed in (
        (f"{deployment['command']}/v1/admin/admission", {"GET", "PUT"}),
        (f"{deployment['query']}/v1/payments/{uuid.uuid4()}", {"GET"}),
    ):
        response = httpx.request("DELETE", url, headers=bearer(deployment["key"]), timeout=10)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in response.headers["Allow"].split(",")} - {"HEAD"} == allowed
