"""``/v1/admin/campaigns`` on the command API, on SQLite and MySQL: campaigns created, changed
and stopped by an admin, each change an event of the campaign's stream with its outbox row.

A replay is the original answer; invalid rules are ``422 invalid_campaign`` naming the field
and write nothing; only the end (later) and the budget (higher, never below what is granted)
change; a stopped campaign stops once; two admins changing one campaign at once are both
answered, at versions 2 and 3, without losing either change.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from command_service import handlers
from command_service.campaigns import change_command
from kessai.auth import ADMIN, PAYMENTS_WRITE, USERS_WRITE
from kessai.campaigns import (
    CampaignChange,
    CampaignChanged,
    CampaignCreated,
    CampaignStopped,
    campaign_stream_id,
    parse_campaign_event,
)
from kessai.db import create_db_engine
from kessai.schema.write import campaign_budget, campaign_events, idempotency_keys, outbox
from kessai.settings import Settings
from tests.helpers import PAYER, api_key, bearer, fund, new_key, payment_body
from tests.integration.command_api import assert_error, error_fields
from tests.integration.test_registrations import running

CAMPAIGNS = "/v1/admin/campaigns"
START = datetime(2026, 12, 1, tzinfo=UTC)


def cashback(**overrides: Any) -> dict[str, Any]:
    """The issue's campaign: 20% back, at most 1,000 yen a payment and 5,000 a user-month."""
    return {
        "kind": "cashback",
        "campaign_id": "winter-20",
        "name": "Winter 20% back",
        "currency": "JPY",
        "budget": 1_000_000,
        "starts_at": START.isoformat(),
        "ends_at": (START + timedelta(days=90)).isoformat(),
        "rate_bp": 2000,
        "cap_per_payment": 1000,
        "cap_per_user_month": 5000,
        **overrides,
    }


def key_id(api: httpx.AsyncClient) -> str:
    """The id of the API key the client sends (``kessai_<id>_<secret>``)."""
    return api.headers["authorization"].removeprefix("Bearer ").split("_")[1]


async def send(
    api: httpx.AsyncClient, method: str, path: str, body: object = None, key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key or new_key()}
    return await api.request(method, path, json=body, headers=headers)


async def create(api: httpx.AsyncClient, body: object, key: str | None = None) -> httpx.Response:
    return await send(api, "POST", CAMPAIGNS, body, key)


async def change(
    api: httpx.AsyncClient, body: object, campaign: str = "winter-20"
) -> httpx.Response:
    return await send(api, "PATCH", f"{CAMPAIGNS}/{campaign}", body)


async def stop(
    api: httpx.AsyncClient, body: object = None, campaign: str = "winter-20"
) -> httpx.Response:
    return await send(api, "POST", f"{CAMPAIGNS}/{campaign}/stop", body)


def written(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (campaign_events, outbox, idempotency_keys)
        }


def stream(engine: Engine, campaign_id: str = "winter-20") -> list[Any]:
    """The campaign's stored events, in version order, each checked against its outbox row:
    keyed by the campaign's stream id, at the event's version, with the same body."""
    stream_id = campaign_stream_id(campaign_id)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(campaign_events)
            .where(campaign_events.c.campaign_id == campaign_id)
            .order_by(campaign_events.c.version)
        ).all()
        queued = {
            row.version: row
            for row in conn.execute(sa.select(outbox).where(outbox.c.payment_id == stream_id))
        }
    assert sorted(queued) == [row.version for row in rows]
    for row in rows:
        assert (queued[row.version].event_type, queued[row.version].body) == (
            row.event_type,
            row.body,
        )
        assert queued[row.version].event_id == row.event_id
    return [parse_campaign_event(row.body) for row in rows]


async def test_a_campaign_is_created_with_its_event_and_outbox_row_and_answered_201(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, ADMIN) as (_, api):
        response = await create(api, cashback())
        shown = await api.get(f"{CAMPAIGNS}/winter-20")
        listed = await api.get(CAMPAIGNS)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rules"] == {
        **cashback(),
        "starts_at": "2026-12-01T00:00:00Z",
        "ends_at": "2027-03-01T00:00:00Z",
        "time_zone": "Asia/Tokyo",
        "min_payment_amount": 0,
        "methods": ["balance", "card"],
        "merchants": None,
    }
    assert (body["campaign_id"], body["version"], body["status"]) == ("winter-20", 1, "active")
    assert (body["granted"], body["remaining"]) == (0, 1_000_000)
    assert (body["event_type"], body["actor"]) == ("CampaignCreated", key_id(api))
    assert body["stopped_at"] is None
    assert body["exhausted_at"] is None
    (event,) = stream(write_engine)
    assert isinstance(event, CampaignCreated)
    assert (str(event.event_id), event.actor) == (body["event_id"], key_id(api))
    assert event.payload.rate_bp == 2000  # type: ignore[union-attr]
    assert shown.status_code == 200, shown.text
    assert {k: v for k, v in shown.json().items() if k != "as_of"} == {
        k: v for k, v in body.items() if k not in ("as_of", "event_id", "event_type", "actor")
    }
    assert [c["campaign_id"] for c in listed.json()["campaigns"]] == ["winter-20"]


async def test_a_replay_is_the_original_answer_and_a_taken_id_is_409_campaign_exists(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, ADMIN) as (_, api):
        key = new_key()
        first = await create(api, cashback(), key)
        again = await create(api, cashback(), key)
        other = await create(api, cashback(name="Another"))
        reused = await create(api, cashback(budget=2_000_000), key)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    error = assert_error(other, 409, "campaign_exists")
    assert error["details"] == {
        "campaign_id": "winter-20",
        "created_at": first.json()["created_at"],
    }
    assert assert_error(reused, 422, "idempotency_key_reused")["details"] == {"fields": ["budget"]}
    assert written(write_engine) == {"campaign_events": 1, "outbox": 1, "idempotency_keys": 1}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (cashback(rate_bp=10_001), {"rate_bp"}),  # over 100%
        (cashback(ends_at=START.isoformat()), {"ends_at"}),  # ends when it starts
        (cashback(ends_at=(START - timedelta(days=1)).isoformat()), {"ends_at"}),
        (cashback(currency="ABC"), {"currency"}),  # no such currency
        (cashback(time_zone="Mars/Olympus"), {"time_zone"}),
        (cashback(kind="lottery"), {"kind"}),
        (cashback(amount=500), {"amount"}),  # a welcome bonus's field
        (cashback(budget=0, cap_per_payment=-1), {"budget", "cap_per_payment"}),
        (cashback(methods=["balance", "balance"]), {"methods"}),
        ({k: v for k, v in cashback().items() if k != "name"}, {"name"}),
        (["winter-20"], {"body"}),
    ],
)
async def test_invalid_rules_are_422_invalid_campaign_naming_each_field_and_write_nothing(
    settings: Settings, write_engine: Engine, body: object, fields: set[str]
) -> None:
    async with running(settings, ADMIN) as (_, api):
        response = await create(api, body)
    error = assert_error(response, 422, "invalid_campaign")
    assert error_fields(error) == fields, error
    assert written(write_engine) == {"campaign_events": 0, "outbox": 0, "idempotency_keys": 0}


async def test_only_a_later_end_and_a_higher_budget_change_a_campaign(
    settings: Settings, write_engine: Engine
) -> None:
    later = (START + timedelta(days=120)).isoformat()
    async with running(settings, ADMIN) as (_, api):
        assert (await create(api, cashback())).status_code == 201
        ended_later = await change(api, {"ends_at": later})
        raised = await change(api, {"budget": 3_000_000})
        renamed = await change(api, {"name": "Spring", "rate_bp": 3000})
        earlier = await change(api, {"ends_at": START.isoformat(), "budget": 10})
        empty = await change(api, {})
        missing = await change(api, {"budget": 5_000_000}, campaign="no-such")
        shown = await api.get(f"{CAMPAIGNS}/winter-20")
    assert ended_later.status_code == raised.status_code == 200, (ended_later.text, raised.text)
    assert (ended_later.json()["version"], raised.json()["version"]) == (2, 3)
    assert ended_later.json()["rules"]["ends_at"] == "2027-03-31T00:00:00Z"
    assert (raised.json()["rules"]["budget"], raised.json()["remaining"]) == (3_000_000, 3_000_000)
    assert error_fields(assert_error(renamed, 422, "invalid_campaign")) == {"name", "rate_bp"}
    assert error_fields(assert_error(earlier, 422, "invalid_campaign")) == {"ends_at", "budget"}
    assert error_fields(assert_error(empty, 422, "invalid_campaign")) == {"body"}
    assert assert_error(missing, 404, "campaign_not_found")["details"] == {"campaign_id": "no-such"}
    assert shown.json()["version"] == 3
    assert shown.json()["rules"]["budget"] == 3_000_000
    assert shown.json()["rules"]["ends_at"] == "2027-03-31T00:00:00Z"
    _created, *changes = stream(write_engine)
    assert [type(e) for e in changes] == [CampaignChanged, CampaignChanged]
    assert [e.payload.model_dump(mode="json") for e in changes] == [
        {"ends_at": "2027-03-31T00:00:00Z"},
        {"budget": 3_000_000},
    ]
    assert written(write_engine) == {"campaign_events": 3, "outbox": 3, "idempotency_keys": 3}


async def test_the_budget_never_goes_below_what_the_campaign_has_granted(
    settings: Settings, write_engine: Engine
) -> None:
    """The rewards service records what a campaign granted in ``campaign_budget``; the test
    plays it with a row of its own: 800,000 granted of 1,000,000."""
    async with running(settings, ADMIN) as (_, api):
        assert (await create(api, cashback())).status_code == 201
        with write_engine.begin() as conn:
            conn.execute(
                campaign_budget.insert().values(
                    campaign_id="winter-20",
                    version=1,
                    amount=800_000,
                    grants=800,
                    granted_after=800_000,
                    recorded_at=datetime.now(UTC),
                )
            )
        below = await change(api, {"budget": 700_000})
        shown = await api.get(f"{CAMPAIGNS}/winter-20")
        raised = await change(api, {"budget": 1_200_000})
    error = assert_error(below, 422, "budget_below_granted")
    assert (error["details"]["budget"], error["details"]["granted"]) == (700_000, 800_000)
    assert error_fields(error) == {"budget"}
    assert (shown.json()["granted"], shown.json()["remaining"]) == (800_000, 200_000)
    assert raised.status_code == 200, raised.text
    assert (raised.json()["granted"], raised.json()["remaining"]) == (800_000, 400_000)
    assert written(write_engine) == {"campaign_events": 2, "outbox": 2, "idempotency_keys": 2}


async def test_a_campaign_stops_once_and_then_cannot_change(
    settings: Settings, write_engine: Engine
) -> None:
    async with running(settings, ADMIN) as (_, api):
        assert (await create(api, cashback())).status_code == 201
        stopped = await stop(api, {"reason": "budget moved to spring"})
        again = await stop(api)
        changed = await change(api, {"budget": 2_000_000})
        missing = await stop(api, campaign="no-such")
        shown = await api.get(f"{CAMPAIGNS}/winter-20")
    assert stopped.status_code == 200, stopped.text
    assert (stopped.json()["status"], stopped.json()["version"]) == ("stopped", 2)
    assert stopped.json()["stopped_at"] == stopped.json()["as_of"]
    error = assert_error(again, 409, "campaign_not_active")
    assert error["details"] == {"campaign_id": "winter-20", "status": "stopped"}
    assert error_fields(assert_error(changed, 422, "invalid_campaign")) == {"budget"}
    assert_error(missing, 404, "campaign_not_found")
    assert (shown.json()["status"], shown.json()["stopped_at"]) == (
        "stopped",
        stopped.json()["stopped_at"],
    )
    _, event = stream(write_engine)
    assert isinstance(event, CampaignStopped)
    assert event.payload.reason == "budget moved to spring"
    assert written(write_engine) == {"campaign_events": 2, "outbox": 2, "idempotency_keys": 2}


@pytest.mark.parametrize(
    "group_commit",
    [{"group_commit": False}, {"group_commit_max_batch": 2, "group_commit_max_delay_ms": 5_000}],
    ids=["alone", "one-batch"],
)
async def test_two_admins_changing_one_campaign_at_once_are_both_answered(
    settings: Settings, write_engine: Engine, group_commit: dict[str, Any]
) -> None:
    async with running(settings, ADMIN) as (_, setup):
        assert (await create(setup, cashback())).status_code == 201
    async with (
        running(settings, ADMIN, **group_commit) as (app, first),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=first.base_url,
            headers=bearer(api_key(settings, ADMIN)),
        ) as second,
    ):
        later, raised = await asyncio.gather(
            change(first, {"ends_at": (START + timedelta(days=100)).isoformat()}),
            change(second, {"budget": 2_000_000}),
        )
        shown = await first.get(f"{CAMPAIGNS}/winter-20")
    assert later.status_code == raised.status_code == 200, (later.text, raised.text)
    assert sorted([later.json()["version"], raised.json()["version"]]) == [2, 3]
    assert (later.json()["actor"], raised.json()["actor"]) == (key_id(first), key_id(second))
    rules = shown.json()["rules"]
    assert (rules["ends_at"], rules["budget"]) == ("2027-03-11T00:00:00Z", 2_000_000)
    assert [e.version for e in stream(write_engine)] == [1, 2, 3]


async def test_a_change_committed_after_the_batch_read_is_decided_again(
    settings: Settings, write_engine: Engine
) -> None:
    """Another process records version 2 after this batch read version 1 and decided: the
    key refuses the batch's version 2, and the batch, decided again, records version 3 on top
    of the other change. (On SQLite, where the batch holds the write lock, the other writer
    writes through the batch's own connection and is rolled back with it: its change is then
    not recorded, and the batch's is version 2.)"""
    url = settings.resolved_write_db_url()
    mysql = sa.make_url(url).get_backend_name() == "mysql"
    other = create_db_engine(url, pool_size=1)
    attempts: list[int] = []

    def concurrent_admin(conn: sa.Connection) -> None:
        attempts.append(1)
        if len(attempts) > 1:
            return
        policy = handlers.WritePolicy("elsewhere", new_key(), timedelta(hours=1), 8, 5)
        command = change_command(
            policy, "winter-20", CampaignChange(budget=5_000_000), actor="other-admin"
        )
        if mysql:
            with other.begin() as theirs:
                assert handlers.record_batch(theirs, [command])[0].status == 200  # type: ignore[union-attr]
        else:
            handlers.record_batch(conn, [command])

    try:
        async with running(settings, ADMIN) as (app, api):
            assert (await create(api, cashback())).status_code == 201
            app.state.resources.recorder.before_write = concurrent_admin
            response = await change(api, {"ends_at": (START + timedelta(days=100)).isoformat()})
            shown = await api.get(f"{CAMPAIGNS}/winter-20")
    finally:
        other.dispose()
    assert attempts == [1, 1]
    assert response.status_code == 200, response.text
    events = stream(write_engine)
    assert response.json()["version"] == len(events) == (3 if mysql else 2)
    assert shown.json()["rules"]["ends_at"] == "2027-03-11T00:00:00Z"
    if mysql:
        assert shown.json()["rules"]["budget"] == 5_000_000
        assert [e.actor for e in events[1:]] == ["other-admin", key_id(api)]


@pytest.mark.parametrize("scope", [PAYMENTS_WRITE, USERS_WRITE])
async def test_a_key_without_admin_is_403_everywhere_and_writes_nothing(
    settings: Settings, write_engine: Engine, scope: str
) -> None:
    async with running(settings, scope) as (_, api):
        answers = [
            await create(api, cashback()),
            await change(api, {"budget": 2_000_000}),
            await stop(api),
            await api.get(CAMPAIGNS),
            await api.get(f"{CAMPAIGNS}/winter-20"),
        ]
    for response in answers:
        assert assert_error(response, 403, "forbidden")["details"] == {"scope": "admin"}
    assert written(write_engine) == {"campaign_events": 0, "outbox": 0, "idempotency_keys": 0}


async def test_reads_show_every_campaign_and_404_an_unknown_one(
    settings: Settings, write_engine: Engine
) -> None:
    bonus = {
        "kind": "welcome_bonus",
        "campaign_id": "signup-500",
        "name": "500 yen on sign-up",
        "currency": "JPY",
        "budget": 10_000_000,
        "starts_at": "2026-12-01T00:00:00+09:00",
        "ends_at": "2027-01-01T00:00:00+09:00",
    }
    async with running(settings, ADMIN) as (_, api):
        assert (await create(api, cashback())).status_code == 201
        assert (await create(api, bonus)).status_code == 201
        listed = await api.get(CAMPAIGNS)
        missing = await api.get(f"{CAMPAIGNS}/no-such")
        malformed = await api.get(f"{CAMPAIGNS}/not a campaign")
    campaigns = listed.json()["campaigns"]
    assert [c["campaign_id"] for c in campaigns] == ["signup-500", "winter-20"]
    assert campaigns[0]["rules"]["amount"] == 500  # a JPY welcome bonus's default
    assert campaigns[0]["rules"]["starts_at"] == "2026-12-01T00:00:00+09:00"  # as given
    assert assert_error(missing, 404, "campaign_not_found")["details"] == {"campaign_id": "no-such"}
    assert_error(malformed, 422, "validation_error")


@pytest.mark.parametrize(
    "group_commit",
    [{"group_commit": False}, {"group_commit_max_batch": 20, "group_commit_max_delay_ms": 5_000}],
    ids=["alone", "one-batch"],
)
async def test_twenty_concurrent_creations_of_one_campaign_create_it_once(
    settings: Settings, write_engine: Engine, group_commit: dict[str, Any]
) -> None:
    async with running(settings, ADMIN, **group_commit) as (_, api):
        responses = await asyncio.gather(
            *(create(api, cashback(name=f"Winter {n}")) for n in range(20))
        )
    assert sorted(r.status_code for r in responses) == [201] + [409] * 19
    (winner,) = (r for r in responses if r.status_code == 201)
    for refused in (r for r in responses if r.status_code == 409):
        details = assert_error(refused, 409, "campaign_exists")["details"]
        assert details["created_at"] == winner.json()["created_at"]
    (event,) = stream(write_engine)
    assert event.payload.name == winner.json()["rules"]["name"]


async def test_a_payment_reads_no_campaign_table(settings: Settings) -> None:
    """Campaign commands make their batch read the campaign's stream and budget; a payment's
    batch reads neither (every statement the command API sends while paying is looked at)."""
    fund(settings, PAYER)
    statements: list[str] = []
    async with running(settings, ADMIN, PAYMENTS_WRITE) as (app, api):
        assert (await create(api, cashback())).status_code == 201
        engine = app.state.resources.engine

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        sa.event.listen(engine, "before_cursor_execute", seen)
        try:
            paid = await api.post(
                "/v1/payments", json=payment_body(), headers={"Idempotency-Key": new_key()}
            )
            assert paid.status_code == 201, paid.text
            payment_statements = list(statements)
            assert (await change(api, {"budget": 2_000_000})).status_code == 200
        finally:
            sa.event.remove(engine, "before_cursor_execute", seen)
    assert payment_statements
    assert not [s for s in payment_statements if "campaign" in s.lower()]
    assert any("campaign_budget" in s for s in statements[len(payment_statements) :])
