"""Rate limits of both APIs: per client IP, per API key, tighter ones for expensive reads,
counted in Redis across processes when it is configured."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from command_service.app import create_app as create_command_app
from kessai.auth import PAYMENTS_WRITE, merchant_scope
from kessai.broker import free_port
from kessai.settings import Settings
from query_service.app import create_app as create_query_app
from tests.helpers import UNLIMITED, api_key, bearer, count_rows, new_key, payment_body
from tests.integration.read_model import migrated_read_db

REDIS_URL = "redis://127.0.0.1:6379/0"


async def started(app: FastAPI, ip: str = "192.0.2.10") -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=(ip, 40000)), base_url="http://k.test"
        ) as client,
    ):
        yield client


async def pay(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(
        "/v1/payments", json=payment_body(), headers={"Idempotency-Key": new_key(), **bearer(key)}
    )


def assert_limited(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["code"], error["details"]["limit"]) == ("rate_limited", limit)
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert int(response.headers["RateLimit-Limit"]) > 0
    assert int(response.headers["RateLimit-Remaining"]) == 0
    assert int(response.headers["RateLimit-Reset"]) == retry


async def test_writes_are_limited_per_key_and_refused_ones_write_nothing(
    settings: Settings, write_engine: Engine
) -> None:
    limited = settings.model_copy(update={"rate_limit_writes": "5/minute"})
    busy, other = api_key(limited, PAYMENTS_WRITE), api_key(limited, PAYMENTS_WRITE)
    async for client in started(create_command_app(limited)):
        assert [(await pay(client, busy)).status_code for _ in range(5)] == [201] * 5
        refused = await pay(client, busy)
        assert_limited(refused, "key")
        # Another key has its own allowance.
        assert (await pay(client, other)).status_code == 201
        metrics = (await client.get("/metrics")).text
        assert re.search(r'kessai_rate_limited_total\{limit="key"\} 1\.0', metrics)
    assert count_rows(write_engine)["events"] == 6


async def test_the_per_ip_limit_comes_before_the_key(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_ip": "3/minute"})
    key = api_key(limited, PAYMENTS_WRITE)
    async for client in started(create_command_app(limited), ip="198.51.100.1"):
        guesses = [
            await client.post("/v1/payments", json={}, headers=bearer(f"kessai_{i:016x}_x"))
            for i in range(3)
        ]
        assert [g.status_code for g in guesses] == [401] * 3
        # Guessing keys used the address's allowance: even a good key is refused from it now.
        assert_limited(await pay(client, key), "ip")
        # Probes are never limited.
        assert (await client.get("/healthz")).status_code == 200
    async for client in started(create_command_app(limited), ip="198.51.100.2"):
        assert (await pay(client, key)).status_code == 201


@pytest.fixture
def query_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    with migrated_read_db("sqlite", tmp_path, None) as url:
        yield settings.model_copy(
            update={
                "read_db_url": url,
                "rate_limit_reads": UNLIMITED,
                "rate_limit_expensive": "2/minute",
            }
        )


async def test_expensive_reads_have_a_tighter_limit_that_spares_the_rest(
    query_settings: Settings,
) -> None:
    key = bearer(api_key(query_settings, merchant_scope("shop-1")))
    async for client in started(create_query_app(query_settings)):
        csv_path = "/v1/merchants/shop-1/payments.csv"
        assert [(await client.get(csv_path, headers=key)).status_code for _ in range(2)] == [
            200,
            200,
        ]
        assert_limited(await client.get(csv_path, headers=key), "expensive")
        long_range = {"from": "2026-01-01", "to": "2026-03-31"}
        summary = await client.get("/v1/merchants/shop-1/summary", params=long_range, headers=key)
        assert_limited(summary, "expensive")
        # The dashboard's ordinary reads go on.
        for path in ("/v1/merchants/shop-1/payments", "/v1/merchants/shop-1/summary"):
            assert (await client.get(path, headers=key)).status_code == 200, path
        short = {"from": "2026-03-01", "to": "2026-03-31"}
        ok = await client.get("/v1/merchants/shop-1/summary", params=short, headers=key)
        assert ok.status_code == 200


async def test_counters_in_redis_are_shared_by_every_process(settings: Settings) -> None:
    shared = settings.model_copy(update={"redis_url": REDIS_URL, "rate_limit_writes": "4/minute"})
    key = api_key(shared, PAYMENTS_WRITE)  # a new key id: counters of no earlier run
    codes = []
    async for first in started(create_command_app(shared)):
        async for second in started(create_command_app(shared)):
            for client in (first, second, first, second, first):
                codes.append((await pay(client, key)).status_code)
    assert codes == [201, 201, 201, 201, 429]


async def test_an_unreachable_counter_store_lets_requests_through(settings: Settings) -> None:
    down = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "rate_limit_writes": "1/minute"}
    )
    key = api_key(down, PAYMENTS_WRITE)
    async for client in started(create_command_app(down)):
        assert [(await pay(client, key)).status_code for _ in range(3)] == [201] * 3
        metrics = (await client.get("/metrics")).text
        found = re.search(r"^kessai_rate_limit_errors_total (\S+)$", metrics, re.MULTILINE)
        assert found is not None
        assert float(found.group(1)) >= 3
