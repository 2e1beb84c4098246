"""Registrations through the whole pipeline, and through two command API processes.

- Two uvicorn processes on one write store register the same users concurrently: each user is
  registered once (the primary key of ``user_registrations``), every other request 409.
- The relay publishes each ``UserRegistered`` keyed by its registration stream; the projector
  knows and skips it (no read row, no park, no dead letter) while the payments beside it are
  projected; a full reconciler run afterwards finds everything consistent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from command_service.relay import Relay
from kessai.auth import USERS_WRITE
from kessai.events import UserRegistered, parse_any_event, registration_stream_id
from kessai.schema.read import dead_letters, parked_events, wallets
from kessai.schema.write import outbox, user_registrations
from kessai.settings import Settings
from projector.service import Projector
from reconciler.service import Reconciler
from tests.helpers import api_key, bearer, consume_all, served_command_api
from tests.integration.test_projector import count, metric
from tests.integration.test_registrations import register, running
from tests.pipeline import make_traffic, read_side_matches, wait_until
from tests.pipeline import running as running_components

USERS = [f"r-{n}" for n in range(20)]


@pytest.fixture
def two_processes(settings: Settings) -> Iterator[tuple[str, str]]:
    with served_command_api(settings) as first, served_command_api(settings) as second:
        yield first, second


async def test_two_processes_registering_the_same_users_register_each_once(
    settings: Settings, write_engine: Engine, two_processes: tuple[str, str]
) -> None:
    headers = bearer(api_key(settings, USERS_WRITE))
    async with (
        httpx.AsyncClient(base_url=two_processes[0], headers=headers, timeout=30) as one,
        httpx.AsyncClient(base_url=two_processes[1], headers=headers, timeout=30) as two,
    ):
        responses = await asyncio.gather(
            *(
                register(client, {"user_id": user, "device_id": f"{tag}-{attempt}"})
                for user in USERS
                for attempt in range(3)
                for tag, client in (("one", one), ("two", two))
            )
        )
    answers: dict[str, list[int]] = {}
    for response in responses:
        user = response.json().get("user_id") or response.json()["error"]["details"]["user_id"]
        answers.setdefault(user, []).append(response.status_code)
    assert {user: sorted(codes) for user, codes in answers.items()} == {
        user: [201] + [409] * 5 for user in USERS
    }
    with write_engine.connect() as conn:
        stored = conn.execute(sa.select(user_registrations.c.user_id)).scalars().all()
        queued = conn.execute(sa.select(outbox.c.payment_id)).scalars().all()
    assert sorted(stored) == sorted(USERS)
    assert sorted(queued) == sorted(registration_stream_id(u) for u in USERS)


async def test_registrations_reach_the_broker_the_projector_skips_them_and_a_full_run_is_consistent(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    settings = pipeline_settings.model_copy(
        update={"reconcile_confirm_seconds": 0.2, "reconcile_verify_timeout_seconds": 30.0}
    )
    async with running(settings) as (_, api):
        for user in USERS:
            assert (await register(api, {"user_id": user})).status_code == 201
    traffic = await asyncio.to_thread(make_traffic, write_engine, payments_count=20)
    registry = CollectorRegistry()
    relay = Relay(engine=write_engine, settings=settings)
    projector = Projector(engine=read_engine, settings=settings, registry=registry)
    async with running_components(relay, projector) as tasks:
        await wait_until(
            lambda: (
                read_side_matches(write_engine, read_engine)
                and metric(registry, "kessai_projector_skipped_total") == len(USERS)
            ),
            tasks=tasks,
        )
        result = await Reconciler(
            write_engine=write_engine, read_engine=read_engine, settings=settings
        ).run(full=True)
    assert result.outcome == "consistent", result.findings
    assert result.findings == []
    assert count(read_engine, dead_letters) == count(read_engine, parked_events) == 0
    with read_engine.connect() as conn:
        shown = set(conn.execute(sa.select(wallets.c.user_id)).scalars())
    assert not shown & set(USERS)  # nothing of a registration is on the read side
    assert traffic.payment_ids  # projected beside them (read_side_matches)
    records = await consume_all(
        settings.resolved_kafka_bootstrap(), settings.topic, at_least=len(USERS)
    )
    published = {}
    for record in records:
        if dict(record.headers).get("event_type") == b"UserRegistered":
            event = parse_any_event(record.value or b"")
            assert isinstance(event, UserRegistered)
            assert uuid.UUID(record.key.decode()) == registration_stream_id(event.user_id)  # type: ignore[union-attr]
            published[event.user_id] = event
    assert sorted(published) == sorted(USERS)
