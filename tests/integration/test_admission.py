"""Device-group admission control on the command API, changed live by an operator."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.engine import Engine

from command_service.admission import MESSAGE_JA, admitted, window_end
from command_service.app import create_app
from kessai.auth import ADMIN, PAYMENTS_WRITE
from kessai.settings import Settings
from tests.helpers import PAYER, api_key, bearer, count_rows, fund, new_key, payment_body

POLICY = {"enabled": True, "percent": 50.0, "window_seconds": 600, "without_device": "refuse"}


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    return {
        "payments": api_key(settings, PAYMENTS_WRITE),
        "admin": api_key(settings, ADMIN),
        "vip": api_key(settings, PAYMENTS_WRITE),
    }


async def started(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 50000)),
            base_url="http://command.test",
        ) as client,
    ):
        yield client


@pytest.fixture
async def client(settings: Settings, keys: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    vip = keys["vip"].split("_")[1]
    configured = settings.model_copy(update={"admission_allow_keys": [vip]})
    async for c in started(configured):
        yield c


async def pay(
    client: httpx.AsyncClient, key: str, device: str | None, **body: object
) -> httpx.Response:
    """A balance payment by ``PAYER`` (unless ``body`` says otherwise): fund the payer first."""
    headers = {"Idempotency-Key": new_key(), **bearer(key)}
    if device is not None:
        headers["X-Device-Id"] = device
    return await client.post("/v1/payments", json=payment_body(**body), headers=headers)


def split_devices(policy: dict[str, object], count: int = 200) -> tuple[list[str], list[str]]:
    now = time.time()
    percent, window = float(policy["percent"]), int(policy["window_seconds"])  # type: ignore[arg-type]
    devices = [f"phone-{i}" for i in range(count)]
    inside = [d for d in devices if admitted(d, percent, window, now)]
    outside = [d for d in devices if not admitted(d, percent, window, now)]
    return inside, outside


async def test_off_by_default_and_changed_live_by_an_operator(
    client: httpx.AsyncClient, keys: dict[str, str], write_engine: Engine
) -> None:
    fund(write_engine, PAYER)
    assert (await pay(client, keys["payments"], None)).status_code == 201
    current = await client.get("/v1/admin/admission", headers=bearer(keys["admin"]))
    assert current.json()["enabled"] is False

    # Only an admin key may change it; bad values are refused and change nothing.
    denied = await client.put("/v1/admin/admission", json=POLICY, headers=bearer(keys["payments"]))
    assert denied.status_code == 403
    for bad in (
        {**POLICY, "percent": 150},
        {**POLICY, "window_seconds": 1},
        {**POLICY, "without_device": "maybe"},
        {**POLICY, "surprise": 1},
        {"enabled": True},
    ):
        refused = await client.put("/v1/admin/admission", json=bad, headers=bearer(keys["admin"]))
        assert refused.status_code == 422, bad
    assert (await client.get("/v1/admin/admission", headers=bearer(keys["admin"]))).json() == (
        current.json()
    )

    changed = await client.put("/v1/admin/admission", json=POLICY, headers=bearer(keys["admin"]))
    assert changed.status_code == 200, changed.text
    assert (await client.get("/v1/admin/admission", headers=bearer(keys["admin"]))).json() == POLICY

    inside, outside = split_devices(POLICY)
    assert inside
    assert outside
    before = count_rows(write_engine)
    refused = await pay(client, keys["payments"], outside[0])
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "temporarily_restricted"
    assert MESSAGE_JA in error["message"]
    assert error["details"]["message_en"]
    # Retry-After points at the end of the window, when another group is admitted.
    now = time.time()
    expected = math.ceil(window_end(600, now) - now)
    assert abs(int(refused.headers["Retry-After"]) - expected) <= 2
    assert count_rows(write_engine) == before  # refused: nothing written

    # An admitted device stays admitted for the whole flow: every request of it passes.
    for _ in range(5):
        assert (await pay(client, keys["payments"], inside[0])).status_code == 201
    # Without X-Device-Id: the configured policy (refuse here).
    missing = await pay(client, keys["payments"], None)
    assert missing.status_code == 503
    assert missing.json()["error"]["details"]["reason"] == "device_id_missing"
    # Allowlisted keys bypass it.
    assert (await pay(client, keys["vip"], outside[0])).status_code == 201
    # Refunds are not part of a device's payment flow: never restricted.
    payment_id = (await pay(client, keys["vip"], outside[0])).json()["payment_id"]
    refund = await client.post(
        f"/v1/payments/{payment_id}/refunds",
        json={"amount": 1},
        headers={"Idempotency-Key": new_key(), **bearer(keys["payments"])},
    )
    assert refund.status_code == 201


async def test_the_live_policy_is_shared_and_outlives_restarts(
    settings: Settings, keys: dict[str, str]
) -> None:
    policy = {**POLICY, "percent": 0.0, "without_device": "admit"}
    fund(settings, PAYER)
    async for first in started(settings):
        changed = await first.put("/v1/admin/admission", json=policy, headers=bearer(keys["admin"]))
        assert changed.status_code == 200
    async for second in started(settings):  # another process, or the same one restarted
        assert (await pay(second, keys["payments"], "phone-1")).status_code == 503
        assert (await pay(second, keys["payments"], None)).status_code == 201


async def test_allowlisted_networks_bypass_it(settings: Settings, keys: dict[str, str]) -> None:
    fund(settings, PAYER)
    configured = settings.model_copy(
        update={
            "admission_enabled": True,
            "admission_percent": 0.0,
            "admission_allow_ips": ["203.0.113.0/24"],
        }
    )
    async for client in started(configured):
        assert (await pay(client, keys["payments"], "phone-1")).status_code == 201
    elsewhere = configured.model_copy(update={"admission_allow_ips": ["198.51.100.0/24"]})
    async for client in started(elsewhere):
        assert (await pay(client, keys["payments"], "phone-1")).status_code == 503
