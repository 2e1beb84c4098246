"""The query API over HTTP: a merchant's summary, exact in its time zone, and its cache.

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from sqlalchemy.engine import Engine

from kessai.broker import free_port
from kessai.clock import utcnow
from tests.integration.query_api.helpers import (
    REDIS_URL,
    T0,
    TOKYO,
    StatementLog,
    assert_error,
    query_settings,
    running,
)
from tests.integration.read_model import (
    captured,
    project,
    refunded,
    set_merchant_time_zone,
    write_offsets,
)

# -- summaries -------------------------------------------------------------------------------


def bucket_map(currency_entry: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Non-empty buckets of a currency, by bucket label, without the label fields."""
    return {
        b["bucket"]: {k: v for k, v in b.items() if k not in {"bucket", "start"}}
        for b in currency_entry["buckets"]
        if b["payments_count"] or b["refunds_count"]
    }


def totals(pc: int, pa: int, rc: int = 0, ra: int = 0) -> dict[str, int]:
    return {
        "payments_count": pc,
        "payments_amount": pa,
        "refunds_count": rc,
        "refunds_amount": ra,
        "net_amount": pa - ra,
    }


async def test_summary_by_day_and_hour_is_exact_in_the_merchants_time_zone(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    p1 = captured(at=T0, merchant_id="shop-a", amount=1000)  # 11-25 01:30 in Tokyo
    p2 = captured(
        at=datetime(2026, 11, 24, 14, 59, 59, tzinfo=UTC), merchant_id="shop-a", amount=2000
    )
    p3 = captured(
        at=datetime(2026, 11, 25, 3, 10, tzinfo=UTC),
        merchant_id="shop-a",
        amount=1999,
        currency="USD",
    )
    p4 = captured(at=datetime(2026, 11, 25, 3, 50, tzinfo=UTC), merchant_id="shop-a", amount=500)
    late_refund = refunded(p2, at=datetime(2026, 11, 26, 0, 15, tzinfo=UTC), amount=700)
    same_day_refund = refunded(p1, at=datetime(2026, 11, 25, 5, 0, tzinfo=UTC), amount=100)
    elsewhere = captured(at=T0, merchant_id="shop-b", amount=123_456)
    ny = captured(at=T0, merchant_id="shop-ny", amount=42)
    set_merchant_time_zone(writer, "shop-ny", "America/New_York")
    zones = {"shop-ny": "America/New_York"}
    project(
        writer,
        [p1, p2, p3, p4, late_refund, same_day_refund, elsewhere, ny],
        zone=lambda m: zones.get(m, "Asia/Tokyo"),
    )

    path = "/v1/merchants/shop-a/summary"
    response = await api.get(path, params={"from": "2026-11-24", "to": "2026-11-26"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["time_zone"] == "Asia/Tokyo"
    assert body["granularity"] == "day"
    assert body["from"] == "2026-11-24T00:00:00+09:00"
    assert body["to"] == "2026-11-27T00:00:00+09:00"
    jpy, usd = body["currencies"]
    assert jpy["currency"] == "JPY"
    assert usd["currency"] == "USD"
    for entry in (jpy, usd):
        assert [b["bucket"] for b in entry["buckets"]] == ["2026-11-24", "2026-11-25", "2026-11-26"]
        assert [b["start"] for b in entry["buckets"]] == [
            f"2026-11-{d}T00:00:00+09:00" for d in (24, 25, 26)
        ]
    assert {k: v for k, v in jpy.items() if k not in {"currency", "buckets"}} == totals(
        3, 3500, 2, 800
    )
    assert bucket_map(jpy) == {
        "2026-11-24": totals(1, 2000),
        "2026-11-25": totals(2, 1500, 1, 100),
        "2026-11-26": totals(0, 0, 1, 700),  # the refund counts on its own day
    }
    assert {k: v for k, v in usd.items() if k not in {"currency", "buckets"}} == totals(1, 1999)
    assert bucket_map(usd) == {"2026-11-25": totals(1, 1999)}
    assert usd["buckets"][0] == {
        "bucket": "2026-11-24",
        "start": "2026-11-24T00:00:00+09:00",
        **totals(0, 0),
    }

    response = await api.get(
        path, params={"from": "2026-11-25", "to": "2026-11-25", "granularity": "hour"}
    )
    body = response.json()
    assert body["from"] == "2026-11-25T00:00:00+09:00"
    assert body["to"] == "2026-11-26T00:00:00+09:00"
    jpy, usd = body["currencies"]
    assert [b["bucket"] for b in jpy["buckets"]] == [f"2026-11-25T{h:02d}:00:00" for h in range(24)]
    assert bucket_map(jpy) == {
        "2026-11-25T01:00:00": totals(1, 1000),
        "2026-11-25T12:00:00": totals(1, 500),
        "2026-11-25T14:00:00": totals(0, 0, 1, 100),
    }
    assert bucket_map(usd) == {"2026-11-25T12:00:00": totals(1, 1999)}

    # Instants: buckets overlapping [01:00, 13:00) Tokyo, the 14:00 refund outside.
    response = await api.get(
        path,
        params={
            "from": "2026-11-25T01:00:00+09:00",
            "to": "2026-11-25T04:00:00Z",
            "granularity": "hour",
        },
    )
    body = response.json()
    jpy = body["currencies"][0]
    assert len(jpy["buckets"]) == 12
    assert {k: v for k, v in jpy.items() if k not in {"currency", "buckets"}} == totals(2, 1500)

    # The merchant's own time zone: 2026-11-24T16:30Z is the 24th in New York.
    body = (await api.get("/v1/merchants/shop-ny/summary", params={"to": "2026-11-24"})).json()
    assert body["time_zone"] == "America/New_York"
    assert body["from"] == "2026-11-24T00:00:00-05:00"
    assert bucket_map(body["currencies"][0]) == {"2026-11-24": totals(1, 42)}

    # Nothing in range: no currencies.
    body = (await api.get(path, params={"from": "2026-10-01", "to": "2026-10-31"})).json()
    assert body["currencies"] == []


async def test_summary_defaults_to_today_and_refuses_bad_ranges(
    api: httpx.AsyncClient, writer: Engine
) -> None:
    now = utcnow()
    project(writer, [captured(at=now, merchant_id="shop-a", amount=321)])
    local_now = now.astimezone(TOKYO)

    body = (await api.get("/v1/merchants/shop-a/summary")).json()
    assert body["granularity"] == "day"
    assert [b["bucket"] for b in body["currencies"][0]["buckets"]] == [local_now.date().isoformat()]
    assert body["currencies"][0]["payments_amount"] == 321

    body = (await api.get("/v1/merchants/shop-a/summary", params={"granularity": "hour"})).json()
    buckets = body["currencies"][0]["buckets"]
    assert len(buckets) == 24
    hour = local_now.replace(minute=0, second=0, microsecond=0, tzinfo=None).isoformat()
    assert bucket_map(body["currencies"][0]) == {hour: totals(1, 321)}

    path = "/v1/merchants/shop-a/summary"
    ok = [
        {"from": "2024-01-01", "to": "2024-12-31"},  # 366 days
        {"from": "2026-11-01", "to": "2026-12-01", "granularity": "hour"},  # 31 * 24 hours
    ]
    for params in ok:
        assert (await api.get(path, params=params)).status_code == 200, params
    too_large = [
        {"from": "2024-01-01", "to": "2025-01-01"},
        {"from": "2026-11-01", "to": "2026-12-02", "granularity": "hour"},
        {"from": "1970-01-01", "to": "9998-12-31"},
    ]
    for params in too_large:
        error = assert_error(await api.get(path, params=params), 422, "range_too_large")
        assert error["details"]["max_buckets"] in {366, 744}
    invalid = [
        {"granularity": "week"},
        {"from": "2026-11-02", "to": "2026-11-01"},
        {"from": "2026-11-02T10:00:00"},  # naive
        {"to": "tomorrow"},
        {"from": "0001-01-01", "to": "9999-12-31"},
        {"to": "9999-12-31T23:59:59-05:00"},
    ]
    for params in invalid:
        assert_error(await api.get(path, params=params), 422, "validation_error")


# -- caches ----------------------------------------------------------------------------------


async def test_a_thousand_concurrent_summaries_cost_a_handful_of_queries(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    project(writer, [captured(at=utcnow(), merchant_id="shop-hot", amount=700)])
    settings = query_settings(read_db_url, tmp_path, summary_cache_seconds=30)
    async with running(settings) as (app, client):
        log = StatementLog(app.state.read_engine)
        responses = await asyncio.gather(
            *(client.get("/v1/merchants/shop-hot/summary") for _ in range(1000))
        )
        log.close()
    assert all(r.status_code == 200 for r in responses)
    bodies = [r.json() for r in responses]
    for body in bodies:
        body.pop("lag_seconds")
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["currencies"][0]["payments_amount"] == 700
    assert bodies[0]["balance"] == [{"currency": "JPY", "amount": 700}]
    # One time-zone lookup, one freshness read, one totals scan and one balance scan (plus
    # BEGINs on SQLite).
    assert len(log.touching("merchant_daily_totals")) == 2
    assert len(log.statements) <= 10, log.statements


async def test_a_cached_summary_keeps_the_freshness_it_was_computed_with(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    now = utcnow()
    project(writer, [captured(at=now, merchant_id="shop-a", amount=100)])
    first_as_of = now - timedelta(seconds=60)
    write_offsets(writer, {0: (first_as_of, None)})
    settings = query_settings(read_db_url, tmp_path, summary_cache_seconds=30)
    async with running(settings) as (_, client):
        body = (await client.get("/v1/merchants/shop-a/summary")).json()
        assert body["currencies"][0]["payments_amount"] == 100
        assert datetime.fromisoformat(body["as_of"]) == first_as_of

        project(writer, [captured(at=now, merchant_id="shop-a", amount=5)])
        write_offsets(writer, {0: (utcnow(), None)})
        await asyncio.sleep(0.6)  # past the freshness cache

        response = await client.get("/v1/merchants/shop-a/summary")
        cached = response.json()
        assert cached["currencies"][0]["payments_amount"] == 100  # served from the cache...
        assert cached["balance"] == [{"currency": "JPY", "amount": 100}]  # the balance too...
        assert datetime.fromisoformat(cached["as_of"]) == first_as_of  # ...with its own as_of
        assert cached["lag_seconds"] >= 60
        assert cached["lag_seconds"] > body["lag_seconds"]
        assert float(response.headers["x-kessai-lag-seconds"]) >= 60

        # An explicit range is not cached: it sees the new payment and the new position.
        today = now.astimezone(TOKYO).date().isoformat()
        fresh = (
            await client.get("/v1/merchants/shop-a/summary", params={"from": today, "to": today})
        ).json()
        assert fresh["currencies"][0]["payments_amount"] == 105
        assert fresh["balance"] == [{"currency": "JPY", "amount": 105}]
        assert fresh["lag_seconds"] < 5


async def test_the_summary_cache_lives_in_redis_when_configured(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    merchant = f"shop-{uuid.uuid4().hex[:12]}"  # keys of this test only
    now = utcnow()
    project(writer, [captured(at=now, merchant_id=merchant, amount=900)])
    as_of = now - timedelta(seconds=3)
    write_offsets(writer, {0: (as_of, None)})
    settings = query_settings(read_db_url, tmp_path, redis_url=REDIS_URL, summary_cache_seconds=30)
    client_redis = redis.asyncio.Redis.from_url(REDIS_URL)
    key = f"kessai:summary:{merchant}:day:{now.astimezone(TOKYO).date().isoformat()}"
    try:
        async with running(settings, merchants=[merchant]) as (_, first):
            computed = (await first.get(f"/v1/merchants/{merchant}/summary")).json()
        assert computed["currencies"][0]["payments_amount"] == 900
        assert await client_redis.exists(key)
        assert 0 < await client_redis.pttl(key) <= 30_000

        project(writer, [captured(at=now, merchant_id=merchant, amount=1)])
        write_offsets(writer, {0: (utcnow(), None)})
        # Another process (a second worker or replica) answers from Redis: no totals query.
        async with running(settings, merchants=[merchant]) as (app, second):
            log = StatementLog(app.state.read_engine)
            served = (await second.get(f"/v1/merchants/{merchant}/summary")).json()
            log.close()
        assert log.touching("merchant_daily_totals") == []
        assert served["currencies"] == computed["currencies"]
        assert served["balance"] == computed["balance"] == [{"currency": "JPY", "amount": 900}]
        assert datetime.fromisoformat(served["as_of"]) == as_of
        assert served["lag_seconds"] >= computed["lag_seconds"]
    finally:
        keys = [k async for k in client_redis.scan_iter(match=f"kessai:summary:{merchant}:*")]
        if keys:
            await client_redis.delete(*keys)
        await client_redis.aclose()


async def test_redis_down_falls_back_to_the_database_and_says_so(
    read_db_url: str, writer: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project(writer, [captured(at=utcnow(), merchant_id="shop-a", amount=77)])
    nobody_listens = f"redis://127.0.0.1:{free_port()}/0"
    settings = query_settings(
        read_db_url, tmp_path, redis_url=nobody_listens, summary_cache_seconds=30
    )
    caplog.set_level(logging.WARNING, logger="query_service.cache")
    async with running(settings) as (app, client):
        log = StatementLog(app.state.read_engine)
        for _ in range(3):
            response = await client.get("/v1/merchants/shop-a/summary")
            assert response.status_code == 200, response.text
            assert response.json()["currencies"][0]["payments_amount"] == 77
        log.close()
    assert any("Redis" in r.getMessage() for r in caplog.records)
    # While Redis is down the process caches: one totals and one balance query for the three
    # requests.
    assert len(log.touching("merchant_daily_totals")) == 2
