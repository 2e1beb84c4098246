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
(a ``validation_error`` of type ``range_empty``), whether a registration's ``referrer`` is its
user (``referrer_is_user``), whether a campaign ends after it starts, is changed to a later
end and a higher budget than it has, is still active, names an IANA time zone and a printable
name (``CAMPAIGN_SEMANTICS``), and an integer written as a float
(``"amount": 1200.0``, refused on purpose, though to a JSON Schema validator it is the integer
1200). Idempotency keys are made unique per request, as a client makes them; replays are tested
in ``test_command_api.py``.

Wallets: whether a wallet covers a balance payment, and which currency it holds, is state, not
schema. So the payer of every valid balance payment is first topped up by its amount in its
currency (``fund_the_payer``, through the command API's own write path): the payment must then
be accepted, and ``402 insufficient_balance`` or ``422 currency_mismatch`` for it is a failure.
Only when the wallet cannot take that top-up (it holds another currency, or generated top-ups
filled it to its limit: the key may top up too) do those two refusals answer a schema-valid
request; they are then not held against "schema-valid requests are accepted", and are still
checked like every answer (a documented status, a body as documented).
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
from pydantic import ValidationError
from schemathesis import Case, CheckContext, Response
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.engine import Engine

from command_service.app import create_app as create_command_app
from command_service.schemas import CreatePayment
from kessai.auth import (
    ADMIN,
    PAYMENTS_WRITE,
    USERS_READ,
    USERS_WRITE,
    WALLETS_WRITE,
    merchant_scope,
)
from kessai.broker import free_port
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.errors import ApiError
from kessai.settings import Settings
from migrations import upgrade
from query_service.app import create_app as create_query_app
from tests import backends
from tests.helpers import UNLIMITED, api_key, bearer, fund
from tests.integration.read_model import captured, project, refunded
from tests.integration.test_acquirer import AcquirerDouble
from tests.wallet_streams import created, granted

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
SEMANTIC_VALIDATION_ERRORS = {"range_empty", "referrer_is_user"}
CAMPAIGN_SEMANTICS = {
    "invalid_campaign",
    "nothing_to_change",
    "earlier",
    "lower",
    "below_granted",
    "campaign_stopped",
    "campaign_ended",
    "campaign_exhausted",
    "name:value_error",
    "time_zone:value_error",
}
"""Types (or ``field:type``) of the errors of ``invalid_campaign`` and ``budget_below_granted``
that no schema can say (``kessai.campaigns``): a campaign's order of instants, its state, what
it granted, the IANA database, printable text."""
VALIDATION_CODES = {"validation_error", "invalid_campaign", "budget_below_granted"}
WALLET_REFUSALS = {"insufficient_balance", "currency_mismatch"}
"""Refusals by a wallet's state (its balance, its currency): see the module docstring."""


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
    """A few payments of ``MERCHANT`` in the read database, one refunded, and two campaigns with
    grants, so the query API's pages, details and cursors have something real to show."""
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
        window = {"starts_at": now - timedelta(days=1), "ends_at": now + timedelta(days=1)}
        events += [created("spring", **window), created("welcome", kind="welcome_bonus", **window)]
        events += [
            granted(f"user-{i % 2}", 500, balance_after=500, version=1, at=now, campaign_id=c)
            for i, c in enumerate(("spring", "welcome"))
        ]
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
    funding: Engine | None = None
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
        scopes = [PAYMENTS_WRITE, WALLETS_WRITE, USERS_WRITE, USERS_READ, ADMIN]
        scopes += [merchant_scope(f"m{i}") for i in range(3)]
        key = api_key(settings, *scopes, name="schemathesis")
        funding = create_db_engine(settings.resolved_write_db_url(), pool_size=1)
        with (
            Server(create_command_app(settings)) as command,
            Server(create_query_app(settings)) as query,
        ):
            yield {"command": command.url, "query": query.url, "key": key, "funding": funding}
    finally:
        if funding is not None:
            funding.dispose()
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
        if error["code"] in WALLET_REFUSALS:
            return response.status_code == (402 if error["code"] == "insufficient_balance" else 422)
        if error["code"] not in VALIDATION_CODES:
            return error["code"] in SEMANTIC_REFUSALS
        floats = _integers_written_as_floats(case)
        return bool(error["details"]["errors"]) and all(
            e["type"] in SEMANTIC_VALIDATION_ERRORS
            or (e["type"] == "int_type" and e["field"] in floats)
            or (
                error["code"] != "validation_error"
                and {e["type"], f"{e['field']}:{e['type']}"} & CAMPAIGN_SEMANTICS
            )
            for e in error["details"]["errors"]
        )
    except (ValueError, KeyError, TypeError):
        return False


def accepted_unless_semantic(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis' "schema-valid requests are accepted", but for the refusals no schema can
    express."""
    if response.status_code in (400, 402, 422) and _inexpressible(response, case):
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


def fund_the_payer(case: Case, engine: Engine) -> bool:
    """Top up the payer of a valid balance payment by its amount, in its currency (``fund``),
    so that the payment must be accepted. False if the case is no such payment, or if the
    wallet cannot take the top-up (it holds another currency, or is at its limit)."""
    if (case.method, case.path) != ("POST", "/v1/payments") or not isinstance(case.body, dict):
        return False
    try:
        payment = CreatePayment.model_validate_json(json.dumps(case.body))
    except ValidationError:  # refused before any wallet is looked at
        return False
    if payment.method != "balance":
        return False
    try:
        fund(engine, payment.user_id, amount=payment.amount, currency=payment.currency)
    except ApiError:  # currency_mismatch or balance_limit_exceeded: the wallet's state decides
        return False
    return True


def refused_by_the_wallet(response: Response | httpx.Response) -> str | None:
    """The code of a wallet refusal (``WALLET_REFUSALS``) the response is, if any."""
    if response.status_code not in (402, 422):
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if code in WALLET_REFUSALS else None


def call_and_check(case: Case, base_url: str, key: str, funding: Engine) -> None:
    fresh_idempotency_key(case)
    funded = fund_the_payer(case, funding)
    response = case.call_and_validate(base_url=base_url, headers=bearer(key), **CHECKS)
    for leak in LEAKS:
        assert leak not in response.text, leak
    if funded:
        assert refused_by_the_wallet(response) is None, ("funded payer refused", response.text)


@command_schema.parametrize()
def test_the_command_api_answers_every_request_as_documented(
    case: Case, deployment: dict[str, Any]
) -> None:
    call_and_check(case, deployment["command"], deployment["key"], deployment["funding"])


@query_schema.parametrize()
def test_the_query_api_answers_every_request_as_documented(
    case: Case, deployment: dict[str, Any]
) -> None:
    call_and_check(case, deployment["query"], deployment["key"], deployment["funding"])


STATEFUL = settings(
    max_examples=STATEFUL_SCENARIOS,
    stateful_step_count=STATEFUL_STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def run_stateful(schema: Any, base_url: str, key: str, funding: Engine) -> None:
    """The stateful phase: sequences of calls that follow the document's links."""
    base = schema.as_state_machine()

    class Workflow(base):  # type: ignore[misc, valid-type]
        funded = False
        """Whether the payer of the call being made was topped up for it (``fund_the_payer``)."""

        def before_call(self, case: Case) -> None:
            fresh_idempotency_key(case)
            self.funded = fund_the_payer(case, funding)

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
            if self.funded:
                refusal = refused_by_the_wallet(response)
                assert refusal is None, ("funded payer refused", response.text)

    Workflow.run(settings=STATEFUL)


def test_payments_and_their_refunds_in_sequence_stay_as_documented(
    deployment: dict[str, Any],
) -> None:
    run_stateful(command_schema, deployment["command"], deployment["key"], deployment["funding"])


def test_pages_and_their_payments_in_sequence_stay_as_documented(
    deployment: dict[str, Any],
) -> None:
    run_stateful(query_schema, deployment["query"], deployment["key"], deployment["funding"])


def test_a_payment_the_wallet_cannot_cover_is_a_documented_402_until_the_payer_is_funded(
    deployment: dict[str, Any],
) -> None:
    """The exemption above, both ways: a schema-valid balance payment by a payer nobody funded
    is ``402 insufficient_balance``, a status and body the document declares for
    ``create_payment``, and passes every other check; once ``fund_the_payer`` topped the payer
    up, the same request is accepted."""
    responses = DOCUMENTS["command"]["paths"]["/v1/payments"]["post"]["responses"]
    assert "insufficient_balance" in responses["402"]["description"]
    assert responses["402"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"
    }
    body = {
        "merchant_id": MERCHANT,
        "user_id": f"unfunded-{uuid.uuid4().hex[:12]}",
        "amount": 1200,
        "currency": "JPY",
        "method": "balance",
    }
    operation = command_schema["/v1/payments"]["POST"]
    base_url, key = deployment["command"], deployment["key"]

    def send() -> Response:
        case = operation.Case(body=body, headers={"Idempotency-Key": f"st-{uuid.uuid4().hex}"})
        response: Response = case.call_and_validate(
            base_url=base_url, headers=bearer(key), **CHECKS
        )
        return response

    refused = send()
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["details"] == {
        "balance": 0,
        "requested": 1200,
        "shortfall": 1200,
        "currency": "JPY",
    }
    payment = operation.Case(body=body, headers={"Idempotency-Key": "unused"})
    assert fund_the_payer(payment, deployment["funding"])
    paid = send()
    assert paid.status_code == 201, paid.text
    assert paid.json()["user_id"] == body["user_id"]


def test_both_schemas_are_served_without_a_key(deployment: dict[str, Any]) -> None:
    """The documents tested above are the ones the running services serve."""
    for service, document in DOCUMENTS.items():
        response = httpx.get(f"{deployment[service]}/openapi.json", timeout=10)
        assert response.status_code == 200
        assert response.json() == document


def test_a_405_names_every_method_of_the_path(deployment: dict[str, Any]) -> None:
    """GET and PUT of the admission policy are two routes on one path: `Allow` names both."""
    for url, allowed in (
        (f"{deployment['command']}/v1/admin/admission", {"GET", "PUT"}),
        (f"{deployment['query']}/v1/payments/{uuid.uuid4()}", {"GET"}),
    ):
        response = httpx.request("DELETE", url, headers=bearer(deployment["key"]), timeout=10)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in response.headers["Allow"].split(",")} - {"HEAD"} == allowed
