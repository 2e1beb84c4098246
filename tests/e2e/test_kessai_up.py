"""``kessai up``, driven over real HTTP like a newcomer would: on the embedded defaults, and
with both databases on MySQL.

Starts the real command (broker, migrations, command API, relay as separate processes), creates
a payment and a refund with an HTTP client, reads the events back from the embedded broker,
then stops everything with SIGTERM and checks nothing is left listening.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kessai.broker import free_port, port_is_open
from kessai.events import PaymentCaptured, PaymentRefunded, parse_event
from kessai.settings import DEFAULT_TOPIC
from tests.helpers import consume_all, new_key, payment_body
from tests.integration.read_model import create_mysql_database, drop_mysql_database


class RunningSystem:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        api: str,
        query: str,
        broker_port: int,
        keys: dict[str, str],
    ) -> None:
        self.process = process
        self.api = api
        self.query = query
        self.broker_port = broker_port
        self.keys = keys
        """The development keys ``kessai up`` wrote to $KESSAI_HOME/dev-keys.json."""

    def auth(self, label: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[label]}"}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"


@pytest.fixture(params=["sqlite", "mysql"])
def database_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Nothing (the embedded default: SQLite files), or both databases on fresh MySQL ones."""
    if request.param == "sqlite":
        yield {}
        return
    server = request.getfixturevalue("mysql_server")
    (write_url, write_db), (read_url, read_db) = (create_mysql_database(server) for _ in "wr")
    try:
        yield {"KESSAI_WRITE_DB_URL": write_url, "KESSAI_READ_DB_URL": read_url}
    finally:
        drop_mysql_database(server, write_db)
        drop_mysql_database(server, read_db)


@pytest.fixture
def system(database_env: dict[str, str], tmp_path: Path) -> Iterator[RunningSystem]:
    api_port, query_port, broker_port = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")},
        "KESSAI_HOME": str(tmp_path / "home"),
        "KESSAI_COMMAND_API_PORT": str(api_port),
        "KESSAI_QUERY_API_PORT": str(query_port),
        "KESSAI_EMBEDDED_BROKER_PORT": str(broker_port),
    }
    env.update(database_env)
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kessai.cli", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            try:
                ready = [
                    httpx.get(f"{url}/readyz", timeout=1).status_code
                    for url in (api, f"http://127.0.0.1:{query_port}")
                ]
                if ready == [200, 200]:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kessai up did not become ready in 60 s"
            time.sleep(0.2)
        keys = json.loads((tmp_path / "home" / "dev-keys.json").read_text())
        yield RunningSystem(process, api, f"http://127.0.0.1:{query_port}", broker_port, keys)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


async def test_payment_over_http_reaches_the_topic(system: RunningSystem) -> None:
    async with httpx.AsyncClient(
        base_url=system.api, timeout=10, headers=system.auth("payments")
    ) as client:
        created = await client.post(
            "/v1/payments",
            json=payment_body(merchant_id="shop-42", amount=1200),
            headers={"Idempotency-Key": new_key(), "X-Device-Id": "device-1"},
        )
        assert created.status_code == 201, created.text
        payment_id = created.json()["payment_id"]
        refunded = await client.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": 200},
            headers={"Idempotency-Key": new_key()},
        )
        assert refunded.status_code == 201, refunded.text
        assert refunded.json()["status"] == "partially_refunded"

    records = await consume_all(system.bootstrap, DEFAULT_TOPIC, at_least=2, within=30)
    assert [r.key for r in records] == [payment_id.encode()] * 2
    captured, refund = (parse_event(r.value) for r in sorted(records, key=lambda r: r.offset))
    assert isinstance(captured, PaymentCaptured)
    assert isinstance(refund, PaymentRefunded)
    assert captured.merchant_id == "shop-42"
    assert captured.payload.amount == 1200
    assert captured.payload.device_id == "device-1"
    assert refund.payload.amount == 200
    assert dict(records[0].headers)["event_type"] in {b"PaymentCaptured", b"PaymentRefunded"}
    assert {dict(r.headers)["event_id"] for r in records} == {
        str(captured.event_id).encode(),
        str(refund.event_id).encode(),
    }


async def test_a_payment_and_its_refund_reach_the_merchant_dashboard(
    system: RunningSystem,
) -> None:
    merchant = "shop-1"  # one of the merchants the development merchant key reads
    async with (
        httpx.AsyncClient(
            base_url=system.api, timeout=10, headers=system.auth("payments")
        ) as command,
        httpx.AsyncClient(
            base_url=system.query, timeout=10, headers=system.auth("merchant")
        ) as query,
    ):
        # Keys are checked: none is 401, another merchant is as absent as one never seen.
        anonymous = await query.get(
            f"/v1/merchants/{merchant}/payments", headers={"Authorization": ""}
        )
        assert anonymous.status_code == 401
        foreign = await query.get("/v1/merchants/shop-9/payments")
        assert (foreign.status_code, foreign.json()["error"]["code"]) == (404, "merchant_not_found")

        created = await command.post(
            "/v1/payments",
            json=payment_body(merchant_id=merchant, amount=1500, store_id='store, "A"'),
            headers={"Idempotency-Key": new_key()},
        )
        assert created.status_code == 201, created.text
        payment_id = created.json()["payment_id"]

        async def listed() -> list[dict[str, object]]:
            page = await query.get(f"/v1/merchants/{merchant}/payments")
            assert page.status_code == 200, page.text
            items: list[dict[str, object]] = page.json()["items"]
            return items

        await _eventually(lambda: _has_version(listed, 1))
        summary = (await query.get(f"/v1/merchants/{merchant}/summary")).json()
        (jpy,) = summary["currencies"]
        assert (jpy["payments_count"], jpy["payments_amount"], jpy["net_amount"]) == (1, 1500, 1500)

        async def stamped() -> bool:
            body = (await query.get(f"/v1/merchants/{merchant}/payments")).json()
            return body["as_of"] is not None and body["lag_seconds"] < 30

        await _eventually(stamped)

        refund = await command.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": 400},
            headers={"Idempotency-Key": new_key()},
        )
        assert refund.status_code == 201, refund.text
        await _eventually(lambda: _has_version(listed, 2))
        (item,) = await listed()
        assert (item["refunded_amount"], item["status"]) == (400, "partially_refunded")
        detail = (await query.get(f"/v1/payments/{payment_id}")).json()
        assert [r["amount"] for r in detail["refunds"]] == [400]
        csv_text = (await query.get(f"/v1/merchants/{merchant}/payments.csv")).text
        rows = list(csv.DictReader(io.StringIO(csv_text)))
        assert [(r["payment_id"], r["store_id"], r["refunded_amount"]) for r in rows] == [
            (payment_id, 'store, "A"', "400")
        ]


async def _has_version(
    listed: Callable[[], Awaitable[list[dict[str, object]]]], version: int
) -> bool:
    items = await listed()
    return len(items) == 1 and items[0]["version"] == version


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not visible on the query side within {within} s"
        await asyncio.sleep(0.1)


def test_sigterm_stops_every_component(system: RunningSystem) -> None:
    api_port = int(system.api.rsplit(":", 1)[1])
    query_port = int(system.query.rsplit(":", 1)[1])
    system.process.send_signal(signal.SIGTERM)
    assert system.process.wait(timeout=30) == 0
    assert not port_is_open("127.0.0.1", api_port)
    assert not port_is_open("127.0.0.1", query_port)
    assert not port_is_open("127.0.0.1", system.broker_port)
