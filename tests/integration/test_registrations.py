"""``POST /v1/users``: a user is registered once, whatever races, on SQLite and MySQL.

A registration appends ``UserRegistered`` to ``user_registrations`` with its outbox row (keyed
by the registration's stream); a replay is the original answer; another key is ``409
user_exists``; concurrent registrations of one user (group commit on and off, and a writer that
commits after the batch read the store) register it once, by the table's primary key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.app import create_app
from command_service.routes.users import registration_command
from command_service.schemas import CreateUser
from kessai.auth import PAYMENTS_WRITE, USERS_WRITE
from kessai.db import create_db_engine
from kessai.events import UserRegistered, parse_any_event, registration_stream_id
from kessai.schema.write import idempotency_keys, outbox, user_registrations
from kessai.settings import Settings
from tests.helpers import api_key, bearer, new_key
from tests.integration.command_api import assert_error

USERS = "/v1/users"


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *scopes: str, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The command API in process, with a key of ``scopes`` (``users:write``) and
    ``overrides`` applied to its settings."""
    app = create_app(settings.model_copy(update=overrides))
    key = api_key(settings, *(scopes or (USERS_WRITE,)))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(key),
        ) as client,
    ):
        yield app, client


async def register(api: httpx.AsyncClient, body: object, key: str | None = None) -> httpx.Response:
    return await api.post(USERS, json=body, headers={"Idempotency-Key": key or new_key()})


def written(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (user_registrations, outbox, idempotency_keys)
        }


async def test_a_registration_is_recorded_with_its_outbox_row_and_answered_201(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as (_, api):
        response = await register(
            api, {"user_id": "u-1", "device_id": "phone-7", "referrer": "u-0"}
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"user_id", "registered_at", "event_id"}
    assert body["user_id"] == "u-1"
    with write_engine.connect() as conn:
        (stored,) = conn.execute(sa.select(user_registrations)).all()
        (queued,) = conn.execute(sa.select(outbox)).all()
    event = parse_any_event(stored.body)
    assert isinstance(event, UserRegistered)
    assert (event.user_id, event.version, event.schema_version) == ("u-1", 1, 2)
    assert (event.payload.device_id, event.payload.referrer) == ("phone-7", "u-0")
    assert str(event.event_id) == body["event_id"] == str(stored.event_id)
    assert event.recorded_at.isoformat().replace("+00:00", "Z") == body["registered_at"]
    assert queued.payment_id == registration_stream_id("u-1")
    assert (queued.version, queued.event_type, queued.body) == (1, "UserRegistered", stored.body)


async def test_a_replay_is_the_original_answer_and_another_key_is_409_user_exists(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings) as (_, api):
        key = new_key()
        first = await register(api, {"user_id": "u-1"}, key)
        again = await register(api, {"user_id": "u-1"}, key)
        other = await register(api, {"user_id": "u-1", "device_id": "phone-8"})
        reused = await register(api, {"user_id": "u-1", "referrer": "u-2"}, key)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    error = assert_error(other, 409, "user_exists")
    assert error["details"] == {"user_id": "u-1", "registered_at": first.json()["registered_at"]}
    assert assert_error(reused, 422, "idempotency_key_reused")["details"] == {
        "fields": ["referrer"]
    }
    assert written(write_engine) == {"user_registrations": 1, "outbox": 1, "idempotency_keys": 1}


@pytest.mark.parametrize(
    "group_commit",
    [{"group_commit": False}, {"group_commit_max_batch": 50, "group_commit_max_delay_ms": 5_000}],
    ids=["alone", "one-batch"],
)
async def test_fifty_concurrent_registrations_of_one_user_register_it_once(
    settings: Settings, write_engine: Engine, group_commit: dict[str, Any]
) -> None:
    async with running(settings, **group_commit) as (_, api):
        responses = await asyncio.gather(
            *(register(api, {"user_id": "u-1", "device_id": f"d-{n}"}) for n in range(50))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 49
    (winner,) = (r for r in responses if r.status_code == 201)
    for refused in (r for r in responses if r.status_code == 409):
        details = assert_error(refused, 409, "user_exists")["details"]
        assert details["registered_at"] == winner.json()["registered_at"]
    assert written(write_engine) == {"user_registrations": 1, "outbox": 1, "idempotency_keys": 1}


async def test_in_one_batch_the_first_registration_of_a_user_wins(
    settings: Settings, write_engine: Engine
) -> None:
    """Decided in arrival order, like refunds of one payment: of two registrations of u-1 in one
    batch, the first is 201 and the second 409; u-2's beside them is 201."""
    async with running(settings, group_commit_max_batch=3, group_commit_max_delay_ms=5_000) as (
        _,
        api,
    ):
        first = asyncio.ensure_future(register(api, {"user_id": "u-1", "device_id": "first"}))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(register(api, {"user_id": "u-1", "device_id": "second"}))
        await asyncio.sleep(0.05)
        third = asyncio.ensure_future(register(api, {"user_id": "u-2"}))
        answers = await asyncio.gather(first, second, third)
    assert [r.status_code for r in answers] == [201, 409, 201]
    with write_engine.connect() as conn:
        bodies = conn.execute(sa.select(user_registrations.c.body)).scalars().all()
    devices = {e.user_id: e.payload.device_id for e in map(parse_any_event, bodies)}  # type: ignore[union-attr]
    assert devices == {"u-1": "first", "u-2": None}


async def test_a_registration_committed_after_the_batch_read_is_refused_by_the_key(
    settings: Settings, write_engine: Engine
) -> None:
    """Another process registers u-1 after this batch read the store and decided (so the read
    saw nothing): the primary key refuses the batch's insert, and the batch, decided again,
    answers 409. On SQLite, where the batch holds the write lock, the other writer can only
    write through the batch's own connection and is rolled back with it: the batch's second
    attempt then registers u-1 itself. Either way u-1 is registered once."""
    url = settings.resolved_write_db_url()
    mysql = sa.make_url(url).get_backend_name() == "mysql"
    other = create_db_engine(url, pool_size=1)
    attempts: list[int] = []

    def concurrent_registrar(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        policy = handlers.WritePolicy("elsewhere", new_key(), timedelta(hours=1), 8, 5)
        command = registration_command(policy=policy, command=CreateUser(user_id="u-1"))
        if mysql:
            with other.begin() as theirs:
                assert handlers.record_batch(theirs, [command])[0].status == 201  # type: ignore[union-attr]
        else:
            handlers.record_batch(conn, [command])

    try:
        async with running(settings) as (app, api):
            app.state.resources.recorder.before_write = concurrent_registrar
            response = await register(api, {"user_id": "u-1"})
    finally:
        other.dispose()
    assert attempts == [1, 1]  # the key refused the first attempt; decided again
    if mysql:
        assert_error(response, 409, "user_exists")
    else:
        assert response.status_code == 201
    assert written(write_engine)["user_registrations"] == 1
    assert written(write_engine)["outbox"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "user_id"),
        ({"user_id": "u 1"}, "user_id"),
        ({"user_id": "x" * 65}, "user_id"),
        ({"user_id": "u-1", "referrer": "u-1"}, "referrer"),
        ({"user_id": "u-1", "referrer": "bad referrer"}, "referrer"),
        ({"user_id": "u-1", "device_id": "has space"}, "device_id"),
        ({"user_id": "u-1", "device_id": "d" * 129}, "device_id"),
        ({"user_id": "u-1", "email": "a@example.com"}, "email"),
        ({"user_id": 7}, "user_id"),
    ],
)
async def test_bad_input_is_422_naming_the_field_and_writes_nothing(
    settings: Settings, write_engine: Engine, body: dict[str, Any], field: str
) -> None:
    async with running(settings) as (_, api):
        response = await register(api, body)
    error = assert_error(response, 422, "validation_error")
    assert field in [e["field"] for e in error["details"]["errors"]], error
    assert written(write_engine) == {"user_registrations": 0, "outbox": 0, "idempotency_keys": 0}


async def test_a_key_without_users_write_is_403_and_writes_nothing(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, PAYMENTS_WRITE) as (_, api):
        response = await register(api, {"user_id": "u-1"})
        missing_key = await api.post(USERS, json={"user_id": "u-1"})
    assert assert_error(response, 403, "forbidden")["details"] == {"scope": "users:write"}
    assert missing_key.status_code in (400, 403)
    assert written(write_engine) == {"user_registrations": 0, "outbox": 0, "idempotency_keys": 0}


@pytest.mark.parametrize(
    "statement",
    ["UPDATE user_registrations SET body = '{}'", "DELETE FROM user_registrations"],
)
async def test_the_store_refuses_to_rewrite_or_remove_a_registration(
    settings: Settings, write_engine: Engine, statement: str
) -> None:
    async with running(settings) as (_, api):
        assert (await register(api, {"user_id": "u-1"})).status_code == 201
    with pytest.raises(sa.exc.DatabaseError) as refused, write_engine.begin() as conn:
        conn.execute(sa.text(statement))
    assert "append-only" in str(refused.value.orig)
    assert written(write_engine)["user_registrations"] == 1
