"""Overload is shed, not queued: the real command API served by uvicorn, flooded over real
connections far past its bound (``kessai/overload.py``)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy.engine import Engine

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE, merchant_scope
from kessai.settings import Settings
from kessai_cli import loadgen
from query_service.app import create_app as create_query_app
from tests.helpers import api_key, count_rows, fund, new_key, payment_body
from tests.integration.command_api import rows_added
from tests.integration.read_model import migrated_read_db
from tests.integration.test_api_schemas import Server

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True, slots=True)
class Seen:
    kind: str
    status: int
    code: str | None
    retry_after: str | None
    seconds: float


def _request(
    kind: str, key: str, method: str, path: str, body: bytes, device: str | None, seen: list[Seen]
) -> loadgen.Request:
    head = f"{method} {path} HTTP/1.1\r\nHost: kessai.test\r\nAuthorization: Bearer {key}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nIdempotency-Key: {new_key(kind)}\r\n"
    if device is not None:
        head += f"X-Device-Id: {device}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"

    def answered(answer: loadgen.Answer, seconds: float) -> None:
        code = None
        if answer.status >= 400:
            code = orjson.loads(answer.body)["error"]["code"]
        seen.append(Seen(kind, answer.status, code, answer.retry_after, seconds))

    return loadgen.Request(head.encode(), body, answered)


SURGE = 48
"""Connections of the flood of new devices: each one a user paying over and over."""


def surge_users() -> list[str]:
    """The payers of the flood, one per connection: the tests fund them (``fund``)."""
    return [f"new-{i}" for i in range(SURGE)]


def new_payments(key: str, seen: list[Seen], user_id: str) -> Callable[[], loadgen.Request]:
    """Payments by ``user_id``, each from a device never seen before (a surge of new devices;
    the load shedder and admission tell requests apart by device, not by user)."""

    def source() -> loadgen.Request:
        body = orjson.dumps(payment_body(user_id=user_id))
        return _request("new", key, "POST", "/v1/payments", body, f"new-{uuid.uuid4().hex}", seen)

    return source


def probes(seen: list[Seen]) -> Callable[[], loadgen.Request]:
    paths = itertools.cycle(["/healthz", "/readyz", "/metrics"])
    return lambda: _request("probe", "-", "GET", next(paths), b"", None, seen)


async def flood(url: str, seconds: float, sources: list[Callable[[], loadgen.Request]]) -> int:
    """Closed loop over one connection per source for ``seconds``; connection errors."""
    errors = 0

    def failed() -> None:
        nonlocal errors
        errors += 1

    await loadgen.drive(url, loadgen.Schedule(None, seconds), sources, failed, 10.0)
    return errors


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * len(ordered)))]


async def test_a_flood_past_the_bound_is_shed_at_once_and_refused_payments_record_nothing(
    settings: Settings, write_engine: Engine
) -> None:
    bounded = settings.model_copy(
        update={"overload_max_in_flight": 4, "overload_max_queue_wait_ms": 5.0}
    )
    key = api_key(bounded, PAYMENTS_WRITE)
    users = surge_users()
    fund(bounded, *users)
    before = count_rows(write_engine)
    seen: list[Seen] = []
    with Server(create_app(bounded)) as server:
        surge = [new_payments(key, seen, user) for user in users]
        errors = await flood(server.url, 2.5, surge + [probes(seen)] * 2)
    assert errors == 0  # no client time-out, no broken connection
    created = [s for s in seen if s.kind == "new" and s.status == 201]
    shed = [s for s in seen if s.kind == "new" and s.status == 503]
    assert {(s.status, s.code) for s in seen if s.kind == "new"} <= {
        (201, None),
        (503, "overloaded"),
    }
    assert len(created) >= 10, len(created)
    assert len(shed) >= len(created), (len(shed), len(created))
    assert all(s.retry_after == "1" for s in shed)
    # A refusal is answered much faster than what the admitted requests' tail took.
    admitted_p99 = p([s.seconds for s in created], 0.99)
    assert statistics.median(s.seconds for s in shed) < admitted_p99 / 3, admitted_p99
    # Probes and metrics are never shed.
    assert {s.status for s in seen if s.kind == "probe"} == {200}
    # Exactly the payments answered 201 were recorded (each with its wallet debit in the
    # outbox): nothing of the refused ones.
    added = rows_added(write_engine, before)
    assert added == {
        "events": len(created),
        "outbox": 2 * len(created),
        "idempotency_keys": len(created),
    }


async def test_refunds_and_returning_devices_get_through_a_flood_of_new_payments(
    settings: Settings, write_engine: Engine
) -> None:
    bounded = settings.model_copy(
        update={
            "overload_max_in_flight": 8,
            "overload_reserved_percent": 50.0,
            "overload_max_queue_wait_ms": 50.0,
        }
    )
    key = api_key(bounded, PAYMENTS_WRITE)
    users = surge_users()
    fund(bounded, "early-0", "early-1", *users)
    seen: list[Seen] = []
    with Server(create_app(bounded)) as server:
        payment_ids = []
        async with httpx.AsyncClient(base_url=server.url) as client:
            for i in range(2):  # two users paid before the surge, on their phones
                answer = await client.post(
                    "/v1/payments",
                    json=payment_body(user_id=f"early-{i}", amount=100_000),
                    headers={
                        "Authorization": f"Bearer {key}",
                        "Idempotency-Key": new_key(),
                        "X-Device-Id": f"early-phone-{i}",
                    },
                )
                assert answer.status_code == 201, answer.text
                payment_ids.append(answer.json()["payment_id"])

        def refunds(payment_id: str) -> Callable[[], loadgen.Request]:
            body = orjson.dumps({"amount": 1, "reason": "changed mind"})
            path = f"/v1/payments/{payment_id}/refunds"
            return lambda: _request("refund", key, "POST", path, body, None, seen)

        def returning(i: int) -> Callable[[], loadgen.Request]:
            def source() -> loadgen.Request:
                body = orjson.dumps(payment_body(user_id=f"early-{i}"))
                device = f"early-phone-{i}"
                return _request("returning", key, "POST", "/v1/payments", body, device, seen)

            return source

        preferred = [refunds(payment_ids[0]), refunds(payment_ids[1]), returning(0), returning(1)]
        surge = [new_payments(key, seen, user) for user in users]
        errors = await flood(server.url, 2.5, surge + preferred)
    assert errors == 0
    by_kind: dict[str, list[int]] = {}
    for s in seen:
        by_kind.setdefault(s.kind, []).append(s.status)
    new = by_kind["new"]
    # New devices were shed for most of the flood...
    assert new.count(503) > new.count(201), (new.count(503), new.count(201))
    # ... while every refund and every payment of a device already served went through.
    for kind in ("refund", "returning"):
        assert len(by_kind[kind]) >= 5, kind
        assert set(by_kind[kind]) == {201}, (kind, sorted(set(by_kind[kind])))
    created = sum(s.status == 201 for s in seen)
    assert count_rows(write_engine)["events"] == created + 2


async def test_the_query_api_sheds_a_flood_too(settings: Settings, tmp_path: Path) -> None:
    with migrated_read_db("sqlite", tmp_path, None) as url:
        bounded = settings.model_copy(
            update={
                "read_db_url": url,
                "overload_max_in_flight": 2,
                "overload_max_queue_wait_ms": 2.0,
            }
        )
        key = api_key(bounded, merchant_scope("shop-1"))
        seen: list[Seen] = []

        def reads() -> loadgen.Request:
            path = "/v1/merchants/shop-1/summary"
            return _request("read", key, "GET", path, b"", None, seen)

        with Server(create_query_app(bounded)) as server:
            errors = await flood(server.url, 1.5, [reads] * 32 + [probes(seen)])
    assert errors == 0
    statuses = {(s.status, s.code) for s in seen if s.kind == "read"}
    assert statuses == {(200, None), (503, "overloaded")}, statuses
    assert {s.status for s in seen if s.kind == "probe"} == {200}


def admitted_percent(metrics: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith("kessai_admission_admitted_percent "):
            return float(line.split()[1])
    return None


async def test_the_adaptive_admitted_share_falls_under_overload_and_rises_after(
    settings: Settings,
) -> None:
    adaptive = settings.model_copy(
        update={
            "admission_enabled": True,
            "admission_percent": 100.0,
            "admission_window_seconds": 600,
            "admission_target_delay_ms": 2.0,
            "overload_max_in_flight": 4,
            "overload_max_queue_wait_ms": 50.0,
        }
    )
    key = api_key(adaptive, PAYMENTS_WRITE)
    users = surge_users()
    fund(adaptive, *users)
    seen: list[Seen] = []
    with Server(create_app(adaptive)) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:

            async def share() -> float | None:
                return admitted_percent((await client.get("/metrics")).text)

            assert await share() == 100.0
            await flood(server.url, 3.5, [new_payments(key, seen, user) for user in users])
            low = await share()
            assert low is not None
            assert low < 100.0
            # The flood is over: the share climbs back as the queue stays clear (within a few
            # one-second intervals; the interval the flood ended in still counts against it).
            readings = []
            for _ in range(20):
                await asyncio.sleep(0.5)
                readings.append(await share())
                if (readings[-1] or 0) > low + 5:
                    break
            assert (readings[-1] or 0) > low + 5, (low, readings)
    statuses = {(s.status, s.code) for s in seen}
    # New devices were shed, or refused for their group while the share was down.
    assert (503, "overloaded") in statuses
    assert (503, "temporarily_restricted") in statuses, statuses
