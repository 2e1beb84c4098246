"""API keys and scopes on both APIs, with the key store on SQLite and on MySQL.

What a caller would notice: no key (or a bad, unknown or revoked one) is 401 before anything
else happens; a key without the route's scope is 403 and changes nothing; a merchant key learns
nothing about other merchants (their payments, lists, summaries and CSVs answer exactly as
for a merchant or payment that does not exist); keys are shown once and only their hash is
kept; outside development the APIs do not start without a key store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from command_service.app import create_app as create_command_app
from kessai.auth import ADMIN, PAYMENTS_WRITE, USERS_READ, Authenticator, merchant_scope
from kessai.clock import utcnow
from kessai.db import create_db_engine
from kessai.schema.keys import api_keys
from kessai.settings import MissingKeyStore, Settings
from kessai_cli.main import app as cli_app
from migrations import upgrade
from query_service.app import create_app as create_query_app
from tests import backends
from tests.helpers import PAYER, api_key, bearer, count_rows, fund, new_key, payment_body
from tests.integration.command_api import rows_added
from tests.integration.read_model import captured, migrated_read_db, project, refunded


@pytest.fixture
def keys_db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated key store on the test's backend."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
        upgrade("keys", url)
        yield url
        return
    server = request.getfixturevalue("mysql_server")
    url, name = backends.create_mysql_database(server)
    try:
        upgrade("keys", url)
        yield url
    finally:
        backends.drop_mysql_database(server, name)


@pytest.fixture
def auth_settings(settings: Settings, keys_db_url: str) -> Settings:
    # No cache: revocation is visible at once (the cache is tested on its own below).
    return settings.model_copy(update={"keys_db_url": keys_db_url, "auth_cache_seconds": 0})


async def client_of(app: FastAPI, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://kessai.test", **kwargs
        ) as client,
    ):
        yield client


@pytest.fixture
async def command(auth_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_of(create_command_app(auth_settings)):
        yield client


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# -- the command API --------------------------------------------------------------------------


async def test_writes_without_a_valid_key_are_401_and_change_nothing(
    command: httpx.AsyncClient, auth_settings: Settings, write_engine: Engine
) -> None:
    good = api_key(auth_settings, PAYMENTS_WRITE)
    revoked = api_key(auth_settings, PAYMENTS_WRITE)
    runner = CliRunner()
    env = {"KESSAI_KEYS_DB_URL": auth_settings.resolved_keys_db_url()}
    assert runner.invoke(cli_app, ["keys", "revoke", revoked.split("_")[1]], env=env).exit_code == 0
    key_id = good.split("_")[1]
    for header in (
        None,
        "",
        "Bearer",
        f"Basic {good}",
        "Bearer not-a-key",
        f"Bearer kessai_{key_id}_{'A' * 43}",  # a real id with the wrong secret
        f"Bearer kessai_{'0' * 16}_{'A' * 43}",  # no such id
        f"Bearer {revoked}",
        f"Bearer {good}' OR '1'='1",
    ):
        headers = {"Idempotency-Key": new_key()}
        if header is not None:
            headers["Authorization"] = header
        response = await command.post("/v1/payments", json=payment_body(), headers=headers)
        assert response.status_code == 401, (header, response.text)
        assert error_code(response) == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert good not in response.text
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}
    fund(write_engine, PAYER)  # so that the valid key's payment below goes through
    # Probes and metrics need no key.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await command.get(path)).status_code == 200, path
    ok = await command.post(
        "/v1/payments",
        json=payment_body(),
        headers={"Idempotency-Key": new_key(), **bearer(good)},
    )
    assert ok.status_code == 201, ok.text


async def test_a_key_without_payments_write_is_403_even_before_its_body_is_checked(
    command: httpx.AsyncClient, auth_settings: Settings, write_engine: Engine
) -> None:
    dashboard = api_key(auth_settings, merchant_scope("shop-1"), USERS_READ, ADMIN)
    for body in (payment_body(), {"amount": "not a number"}):
        response = await command.post(
            "/v1/payments", json=body, headers={"Idempotency-Key": new_key(), **bearer(dashboard)}
        )
        assert response.status_code == 403, response.text
        assert response.json()["error"] == {
            "code": "forbidden",
            "message": "This API key lacks the 'payments:write' scope.",
            "details": {"scope": "payments:write"},
        }
    refund = await command.post(
        f"/v1/payments/{uuid.uuid4()}/refunds",
        json={"amount": 1},
        headers={"Idempotency-Key": new_key(), **bearer(dashboard)},
    )
    assert refund.status_code == 403
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}


async def test_idempotency_keys_belong_to_their_api_key(
    command: httpx.AsyncClient, auth_settings: Settings, write_engine: Engine
) -> None:
    first, second = (api_key(auth_settings, PAYMENTS_WRITE) for _ in range(2))
    fund(write_engine, PAYER)
    before = count_rows(write_engine)
    shared = new_key()
    a = await command.post(
        "/v1/payments",
        json=payment_body(amount=100),
        headers={"Idempotency-Key": shared, **bearer(first)},
    )
    b = await command.post(
        "/v1/payments",
        json=payment_body(amount=200),
        headers={"Idempotency-Key": shared, **bearer(second)},
    )
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["payment_id"] != b.json()["payment_id"]
    replay = await command.post(
        "/v1/payments",
        json=payment_body(amount=100),
        headers={"Idempotency-Key": shared, **bearer(first)},
    )
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == a.json()
    # Two payments, each with its wallet debit in the outbox too; the replay wrote nothing.
    assert rows_added(write_engine, before) == {
        "events": 2,
        "outbox": 4,
        "idempotency_keys": 2,
    }


async def test_a_revoked_key_stops_working_within_the_cache_time(
    auth_settings: Settings,
) -> None:
    cached = auth_settings.model_copy(update={"auth_cache_seconds": 60})
    key = api_key(cached, PAYMENTS_WRITE)
    fund(cached, PAYER)
    async for client in client_of(create_command_app(cached), headers=bearer(key)):
        body = payment_body()
        first = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 201
        engine = create_db_engine(cached.resolved_keys_db_url(), pool_size=1)
        with engine.begin() as conn:
            conn.execute(api_keys.update().values(revoked_at=utcnow()))
        engine.dispose()
        # Within the cache time the key still works (no key-store query per request)...
        again = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": "k2"})
        assert again.status_code == 201
    # ...and a process that looks it up again refuses it.
    async for client in client_of(create_command_app(cached), headers=bearer(key)):
        refused = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": "k3"})
        assert refused.status_code == 401


async def test_concurrent_requests_of_an_uncached_key_look_it_up_once(
    auth_settings: Settings,
) -> None:
    """When a busy key is not (or no longer) cached, the requests that arrive together wait
    for one key-store lookup instead of each running one; all of them are served."""
    cached = auth_settings.model_copy(update={"auth_cache_seconds": 60})
    key = api_key(cached, PAYMENTS_WRITE)
    fund(cached, PAYER)
    app = create_command_app(cached)
    lookups: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_keys" in statement:
            lookups.append(statement)

    async for client in client_of(app, headers=bearer(key)):
        engine = app.state.authenticator.engine
        sa.event.listen(engine, "before_cursor_execute", count)
        try:
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/v1/payments", json=payment_body(), headers={"Idempotency-Key": f"c{i}"}
                    )
                    for i in range(20)
                )
            )
        finally:
            sa.event.remove(engine, "before_cursor_execute", count)
        assert [a.status_code for a in answers] == [201] * 20
        assert len(lookups) == 1


class SteppingClock:
    """A clock that moves ``step`` seconds each time it is read. With a step over half the
    cache time, an entry that one reading finds fresh has expired by the next reading."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_a_cached_key_expiring_during_its_lookup_is_still_accepted(
    auth_settings: Settings,
) -> None:
    """A cache entry that expires between "is it cached?" and "give it to me" was a KeyError,
    a 500 for a valid key (about 2 lookups in 1,000 in a tight loop). The stepping clock puts
    the expiry exactly there on every lookup; the key store is the real one."""
    key = api_key(auth_settings, PAYMENTS_WRITE)
    engine = create_db_engine(auth_settings.resolved_keys_db_url(), pool_size=2)
    authenticator = Authenticator(engine, cache_seconds=1.0, timer=SteppingClock(0.6))
    try:
        for _ in range(5):
            principals = await asyncio.gather(
                *(authenticator.authenticate(f"Bearer {key}") for _ in range(20))
            )
            assert {p.scopes for p in principals} == {frozenset({PAYMENTS_WRITE})}
    finally:
        engine.dispose()


async def test_both_apis_answer_a_tight_loop_while_the_key_keeps_expiring(
    auth_settings: Settings, read_db: str
) -> None:
    """Through each API, a valid key whose cache entry expires mid-lookup on every request
    (the stepping clock) is served every time: no 500."""
    settings = auth_settings.model_copy(update={"read_db_url": read_db})
    key = bearer(api_key(settings, PAYMENTS_WRITE, merchant_scope("shop-1")))
    fund(settings, PAYER)
    for app, path in (
        (create_command_app(settings), "/v1/payments"),
        (create_query_app(settings), "/v1/merchants/shop-1/payments"),
    ):
        async for client in client_of(app, headers=key):
            engine = app.state.authenticator.engine
            app.state.authenticator = Authenticator(
                engine, cache_seconds=1.0, timer=SteppingClock(0.6)
            )
            statuses = set()
            for _ in range(50):
                if path == "/v1/payments":
                    response = await client.post(
                        path, json=payment_body(), headers={"Idempotency-Key": new_key()}
                    )
                else:
                    response = await client.get(path)
                statuses.add(response.status_code)
            assert statuses == ({201} if path == "/v1/payments" else {200}), path


def test_outside_development_the_apis_refuse_to_start_without_a_key_store(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path, environment="production", keys_db_url=None)
    for create in (create_command_app, create_query_app):
        with pytest.raises(MissingKeyStore, match="KESSAI_KEYS_DB_URL"):
            create(settings)


async def test_logs_never_contain_keys(
    command: httpx.AsyncClient, auth_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    key = api_key(auth_settings, PAYMENTS_WRITE)
    fund(auth_settings, PAYER)  # the valid key's payment is accepted, logged as a success
    with caplog.at_level(logging.DEBUG):
        for auth in (bearer(key), bearer(key + "x")):
            await command.post(
                "/v1/payments", json=payment_body(), headers={"Idempotency-Key": new_key(), **auth}
            )
    assert key.split("_", 2)[2] not in caplog.text


# -- the query API: merchants see only themselves ---------------------------------------------


@pytest.fixture
def read_db(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    server = request.getfixturevalue("mysql_server") if backend == "mysql" else None
    with migrated_read_db(backend, tmp_path, server) as url:
        yield url


@pytest.fixture
async def query(auth_settings: Settings, read_db: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = auth_settings.model_copy(update={"read_db_url": read_db})
    async for client in client_of(create_query_app(settings)):
        yield client


MERCHANT_ROUTES = (
    "/v1/merchants/{merchant_id}/payments",
    "/v1/merchants/{merchant_id}/summary",
    "/v1/merchants/{merchant_id}/payments.csv",
)


async def test_a_merchant_key_learns_nothing_about_other_merchants(
    query: httpx.AsyncClient, auth_settings: Settings, read_db: str
) -> None:
    now = utcnow()
    mine, theirs = captured(at=now, merchant_id="shop-1"), captured(at=now, merchant_id="shop-2")
    writer = create_db_engine(read_db, pool_size=1)
    project(writer, [mine, theirs, refunded(theirs, at=now, amount=10)])
    writer.dispose()
    key = bearer(api_key(auth_settings, merchant_scope("shop-1")))

    # Every data route of the API is covered below (a new one must be added here).
    documented = set((await query.get("/openapi.json")).json()["paths"])
    assert {p for p in documented if "{merchant_id}" in p} == set(MERCHANT_ROUTES)

    # Its own merchant: everything.
    for route in MERCHANT_ROUTES:
        own = await query.get(route.format(merchant_id="shop-1"), headers=key)
        assert own.status_code == 200, (route, own.text)
    detail = await query.get(f"/v1/payments/{mine.payment_id}", headers=key)
    assert detail.status_code == 200

    # Another merchant's payment reads exactly like a payment that does not exist.
    foreign = await query.get(f"/v1/payments/{theirs.payment_id}", headers=key)
    nobody = uuid.uuid4()
    absent = await query.get(f"/v1/payments/{nobody}", headers=key)
    assert (foreign.status_code, absent.status_code) == (404, 404)
    assert foreign.text.replace(str(theirs.payment_id), "ID") == absent.text.replace(
        str(nobody), "ID"
    )
    assert "shop-2" not in foreign.text

    # Another merchant's list, summary and CSV read exactly like a merchant that never existed.
    for route in MERCHANT_ROUTES:
        other = await query.get(route.format(merchant_id="shop-2"), headers=key)
        never = await query.get(route.format(merchant_id="shop-never"), headers=key)
        assert (other.status_code, never.status_code) == (404, 404), route
        assert error_code(other) == "merchant_not_found"
        assert other.text.replace("shop-2", "M") == never.text.replace("shop-never", "M")
        assert set(other.headers) == set(never.headers)

    # Keys without a merchant scope at all are treated the same way.
    writer_key = bearer(api_key(auth_settings, PAYMENTS_WRITE))
    for route in MERCHANT_ROUTES:
        response = await query.get(route.format(merchant_id="shop-1"), headers=writer_key)
        assert error_code(response) == "merchant_not_found"
    assert (
        await query.get(f"/v1/payments/{mine.payment_id}", headers=writer_key)
    ).status_code == 404


async def test_one_key_may_read_several_merchants(
    query: httpx.AsyncClient, auth_settings: Settings, read_db: str
) -> None:
    now = utcnow()
    events = [captured(at=now, merchant_id=m) for m in ("shop-1", "shop-2", "shop-3")]
    writer = create_db_engine(read_db, pool_size=1)
    project(writer, events)
    writer.dispose()
    key = bearer(api_key(auth_settings, merchant_scope("shop-1"), merchant_scope("shop-2")))
    seen = {}
    for event in events:
        response = await query.get(f"/v1/merchants/{event.merchant_id}/payments", headers=key)
        seen[event.merchant_id] = response.status_code
    assert seen == {"shop-1": 200, "shop-2": 200, "shop-3": 404}


async def test_users_and_admin_routes_need_their_scopes(
    query: httpx.AsyncClient, auth_settings: Settings
) -> None:
    merchant = bearer(api_key(auth_settings, merchant_scope("shop-1")))
    users = bearer(api_key(auth_settings, USERS_READ))
    admin = bearer(api_key(auth_settings, ADMIN))
    cases = [
        ("/v1/users/user-1/payments", users, merchant, "users:read"),
        ("/v1/admin/reconciliation/runs", admin, users, "admin"),
        ("/v1/admin/campaigns", admin, users, "admin"),
    ]
    for path, allowed, refused, scope in cases:
        assert (await query.get(path, headers=allowed)).status_code == 200, path
        denied = await query.get(path, headers=refused)
        assert denied.status_code == 403, path
        assert denied.json()["error"]["details"] == {"scope": scope}
        assert (await query.get(path)).status_code == 401


# -- kessai keys -------------------------------------------------------------------------------


def test_keys_are_shown_once_and_stored_only_as_hashes(auth_settings: Settings) -> None:
    runner = CliRunner()
    env = {"KESSAI_KEYS_DB_URL": auth_settings.resolved_keys_db_url(), "COLUMNS": "200"}
    created = runner.invoke(
        cli_app,
        ["keys", "create", "--scope", "merchant:shop-1:read", "--scope", "users:read",
         "--name", "dashboard"],
        env=env,
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    assert key.startswith("kessai_")
    key_id, secret = key.split("_", 2)[1:]

    listed = runner.invoke(cli_app, ["keys", "list"], env=env)
    assert listed.exit_code == 0
    assert key_id in listed.output
    assert "dashboard" in listed.output
    assert "merchant:shop-1:read users:read" in listed.output
    assert secret not in listed.output

    engine = create_db_engine(auth_settings.resolved_keys_db_url(), pool_size=1)
    with engine.connect() as conn:
        stored = [tuple(str(v) for v in row) for row in conn.execute(sa.select(api_keys))]
    engine.dispose()
    assert len(stored) == 1
    assert not any(secret in value for value in stored[0])

    for bad in (["--scope", "merchant:shop 1:read"], ["--scope", "root"], []):
        refused = runner.invoke(cli_app, ["keys", "create", *bad], env=env)
        assert refused.exit_code == 2, (bad, refused.output)
    assert runner.invoke(cli_app, ["keys", "revoke", key_id], env=env).exit_code == 0
    assert runner.invoke(cli_app, ["keys", "revoke", key_id], env=env).exit_code == 1
