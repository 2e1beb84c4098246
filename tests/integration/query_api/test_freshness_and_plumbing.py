"""The query API over HTTP: freshness on every answer, validation, probes and docs.

Every test runs on SQLite and on MySQL/MariaDB unless its name says otherwise. Data reaches the
read database the way the projector puts it there (``tests/integration/read_model.py``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from tests.integration.query_api.helpers import (
    T0,
    assert_error,
    query_settings,
    running,
)
from tests.integration.read_model import (
    captured,
    project,
    write_offsets,
)
from tests.wallet_streams import created

# -- freshness -------------------------------------------------------------------------------


async def test_every_data_response_says_how_fresh_it_is(
    read_db_url: str, writer: Engine, tmp_path: Path
) -> None:
    payment = captured(at=T0, merchant_id="shop-a", user_id="user-1")
    project(writer, [payment, created("spring")])
    routes = [
        ("/v1/payments/{payment_id}", f"/v1/payments/{payment.payment_id}"),
        ("/v1/merchants/{merchant_id}/payments", "/v1/merchants/shop-a/payments"),
        ("/v1/users/{user_id}/payments", "/v1/users/user-1/payments"),
        ("/v1/users/{user_id}/balance", "/v1/users/user-1/balance"),
        ("/v1/users/{user_id}/statement", "/v1/users/user-1/statement"),
        ("/v1/merchants/{merchant_id}/summary", "/v1/merchants/shop-a/summary"),
        (
            "/v1/merchants/{merchant_id}/summary",
            "/v1/merchants/shop-a/summary?from=2026-11-25&to=2026-11-25",
        ),
        ("/v1/admin/reconciliation/runs", "/v1/admin/reconciliation/runs"),
        ("/v1/admin/campaigns", "/v1/admin/campaigns"),
        ("/v1/admin/campaigns/{campaign_id}", "/v1/admin/campaigns/spring"),
    ]
    paths = [path for _, path in routes]
    settings = query_settings(read_db_url, tmp_path)
    async with running(settings) as (_, client):
        # Every route but the probes is covered (a new one must be added here).
        documented = set((await client.get("/openapi.json")).json()["paths"])
        csv_route = "/v1/merchants/{merchant_id}/payments.csv"
        assert documented - {"/healthz", "/readyz"} == {t for t, _ in routes} | {csv_route}
        for path in paths:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            assert response.json()["as_of"] is None
            assert response.json()["lag_seconds"] is None
            assert "x-kessai-as-of" not in response.headers

    now = utcnow()
    write_offsets(
        writer,
        {
            0: (now - timedelta(seconds=30), now - timedelta(seconds=5)),  # fresh: 5 s
            1: (now - timedelta(seconds=20), None),  # the stalest partition: 20 s
            2: (now - timedelta(seconds=40), now - timedelta(seconds=8)),  # 8 s
            3: (None, None),  # nothing applied yet: says nothing
        },
    )
    write_offsets(writer, {0: (now - timedelta(hours=1), None)}, topic="another.topic")
    expected = now - timedelta(seconds=20)
    async with running(settings) as (_, client):
        for path in [*paths, "/v1/merchants/shop-a/payments.csv"]:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            header_as_of = datetime.fromisoformat(response.headers["x-kessai-as-of"])
            header_lag = float(response.headers["x-kessai-lag-seconds"])
            assert header_as_of == expected
            assert 20 <= header_lag < 30
            if path.endswith(".csv"):
                continue
            body = response.json()
            assert datetime.fromisoformat(body["as_of"]) == expected
            assert body["lag_seconds"] == pytest.approx(header_lag, abs=0.01)
        # A 404 still says how far the projector has got.
        response = await client.get(f"/v1/payments/{uuid.uuid4()}")
        assert response.status_code == 404
        assert datetime.fromisoformat(response.headers["x-kessai-as-of"]) == expected


# -- validation and plumbing -----------------------------------------------------------------


async def test_malformed_requests_are_422_validation_error_naming_the_field(
    api: httpx.AsyncClient,
) -> None:
    cases = [
        ("/v1/merchants/" + "m" * 65 + "/payments", "path.merchant_id"),
        ("/v1/merchants/bad%20id/payments", "path.merchant_id"),
        ("/v1/merchants/bad.id/summary", "path.merchant_id"),
        ("/v1/merchants/shop-a/payments?limit=0", "query.limit"),
        ("/v1/merchants/shop-a/payments?limit=501", "query.limit"),
        ("/v1/merchants/shop-a/payments?limit=ten", "query.limit"),
        ("/v1/merchants/shop-a/payments?status=pending", "query.status"),
        ("/v1/merchants/shop-a/payments?method=cash", "query.method"),
        ("/v1/merchants/shop-a/payments?min_amount=-1", "query.min_amount"),
        ("/v1/merchants/shop-a/payments?max_amount=1.5", "query.max_amount"),
        ("/v1/merchants/shop-a/payments?user_id=bad!id", "query.user_id"),
        ("/v1/merchants/shop-a/payments?from=yesterday", "query.from"),
        ("/v1/merchants/shop-a/payments?from=2026-11-24T10:00:00", "query.from"),
        ("/v1/merchants/shop-a/payments?to=2026-13-01", "query.to"),
        ("/v1/merchants/shop-a/payments?from=2026-11-02&to=2026-11-01", "query.to"),
        ("/v1/merchants/shop-a/payments.csv?min_amount=x", "query.min_amount"),
        ("/v1/merchants/shop-a/summary?granularity=week", "query.granularity"),
        ("/v1/users/" + "u" * 65 + "/payments", "path.user_id"),
        ("/v1/users/u%2Fx/payments", "path.user_id"),
        ("/v1/payments/1234", "path.payment_id"),
    ]
    for path, field in cases:
        response = await api.get(path)
        if response.status_code == 404:  # an encoded slash may not even match a route
            assert path.startswith("/v1/users/u%2F")
            continue
        error = assert_error(response, 422, "validation_error")
        assert field in {e["field"] for e in error["details"]["errors"]}, (path, error)


async def test_health_readiness_metrics_and_docs(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready"}
    await api.get("/v1/merchants/shop-a/payments")
    metrics = (await api.get("/metrics")).text
    assert 'route="/v1/merchants/{merchant_id}/payments",service="query"' in metrics
    spec = (await api.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/v1/payments/{payment_id}",
        "/v1/merchants/{merchant_id}/payments",
        "/v1/merchants/{merchant_id}/payments.csv",
        "/v1/merchants/{merchant_id}/summary",
        "/v1/users/{user_id}/payments",
        "/healthz",
        "/readyz",
    }
    assert (await api.get("/docs")).status_code == 200
