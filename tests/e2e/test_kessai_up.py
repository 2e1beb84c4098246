"""``kessai up``, driven over real HTTP like a newcomer would: on the embedded defaults, and
with both databases on MySQL.

Starts the real command (broker, migrations, command API, relay as separate processes), tops up
the payer's wallet and creates a balance payment and a refund with an HTTP client (the
development keys of ``kessai up``), reads the events back from the embedded broker, then stops
everything with SIGTERM and checks nothing is left listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from kessai.broker import free_port, port_is_open
from kessai.events import (
    PaymentCaptured,
    PaymentRefunded,
    TopUpReceived,
    WalletCredited,
    WalletDebited,
    parse_event,
    parse_wallet_event,
    wallet_stream_id,
)
from kessai.money import MAX_AMOUNT
from kessai.settings import DEFAULT_TOPIC, Settings
from kessai_cli.up import STOP_SECONDS
from tests.helpers import FUNDS, PAYER, consume_all, new_key, payment_body
from tests.integration.read_model import create_mysql_database, drop_mysql_database


class RunningSystem:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        api: str,
        query: str,
        broker_port: int,
        keys: dict[str, str],
        *,
        screen: Path,
    ) -> None:
        self.process = process
        self.api = api
        self.query = query
        self.broker_port = broker_port
        self.keys = keys
        """The development keys ``kessai up`` wrote to $KESSAI_HOME/dev-keys.json."""
        self.screen = screen
        """What ``kessai up`` printed (its stdout and stderr)."""

    def auth(self, label: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[label]}"}

    def top_up(self, user_id: str, amount: int = FUNDS) -> dict[str, Any]:
        """Top up ``user_id``'s wallet with the development ``wallets`` key, as a newcomer
        would before paying from it: a balance payment from an empty wallet is 402."""
        answer = httpx.post(
            f"{self.api}/v1/users/{user_id}/top-ups",
            json={"amount": amount, "currency": "JPY", "source": "bank"},
            headers={**self.auth("wallets"), "Idempotency-Key": new_key("top-up")},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

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
    with _kessai_up(tmp_path, database_env) as running:
        yield running


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[RunningSystem]:
    """``kessai up`` on the embedded defaults only (SQLite files, the bundled broker): the
    supervision tests are about processes, not databases."""
    with _kessai_up(tmp_path, {}) as running:
        yield running


@contextlib.contextmanager
def _kessai_up(tmp_path: Path, extra_env: dict[str, str]) -> Iterator[RunningSystem]:
    api_port, query_port, broker_port = free_port(), free_port(), free_port()
    env = _env(tmp_path, api_port, query_port, broker_port)
    env.update(extra_env)
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kessai_cli", "up"],
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
        yield RunningSystem(
            process,
            api,
            f"http://127.0.0.1:{query_port}",
            broker_port,
            keys,
            screen=tmp_path / "up.log",
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _env(tmp_path: Path, api_port: int, query_port: int, broker_port: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")},
        "KESSAI_HOME": str(tmp_path / "home"),
        "KESSAI_COMMAND_API_PORT": str(api_port),
        "KESSAI_QUERY_API_PORT": str(query_port),
        "KESSAI_EMBEDDED_BROKER_PORT": str(broker_port),
        # The payers are topped up far past what one should hold (FUNDS), so that paying
        # continuously never empties a wallet: the limit is tested alone.
        "KESSAI_WALLET_MAX_BALANCE": str(MAX_AMOUNT),
    }


async def test_payment_over_http_reaches_the_topic(system: RunningSystem) -> None:
    funded = system.top_up(PAYER)
    assert (funded["balance"], funded["version"]) == (FUNDS, 1)
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

    # The payment's two events, and the wallet's three movements (top-up, debit, credit).
    records = await consume_all(system.bootstrap, DEFAULT_TOPIC, at_least=5, within=30)
    ordered = sorted(records, key=lambda r: (r.partition, r.offset))
    payment_types = {"PaymentCaptured", "PaymentRefunded"}
    payment_records = [r for r in ordered if _event_type(r) in payment_types]
    wallet_records = [r for r in ordered if _event_type(r) not in payment_types]
    assert [r.key for r in payment_records] == [payment_id.encode()] * 2
    captured, refund = (parse_event(r.value) for r in payment_records)
    assert isinstance(captured, PaymentCaptured)
    assert isinstance(refund, PaymentRefunded)
    assert captured.merchant_id == "shop-42"
    assert captured.payload.amount == 1200
    assert captured.payload.device_id == "device-1"
    assert refund.payload.amount == 200
    assert {dict(r.headers)["event_id"] for r in payment_records} == {
        str(captured.event_id).encode(),
        str(refund.event_id).encode(),
    }
    # The wallet's stream, keyed by its own id, in order: what the balance did.
    assert [r.key for r in wallet_records] == [str(wallet_stream_id(PAYER)).encode()] * 3
    top_up, debit, credit = (parse_wallet_event(r.value) for r in wallet_records)
    assert isinstance(top_up, TopUpReceived)
    assert isinstance(debit, WalletDebited)
    assert isinstance(credit, WalletCredited)
    assert [e.version for e in (top_up, debit, credit)] == [1, 2, 3]
    assert (debit.payload.payment_id, debit.payload.amount) == (captured.payment_id, 1200)
    assert (credit.payload.refund_id, credit.payload.amount) == (refund.payload.refund_id, 200)
    assert [e.payload.balance_after for e in (top_up, debit, credit)] == [
        FUNDS,
        FUNDS - 1200,
        FUNDS - 1000,
    ]
    assert [_event_type(r) for r in wallet_records] == [
        "TopUpReceived",
        "WalletDebited",
        "WalletCredited",
    ]


def _event_type(record: Any) -> str:
    """The ``event_type`` header of a record read from the topic."""
    value: bytes = dict(record.headers)["event_type"]
    return value.decode()


async def test_a_payment_and_its_refund_reach_the_merchant_dashboard(
    system: RunningSystem,
) -> None:
    merchant = "shop-1"  # one of the merchants the development merchant key reads
    system.top_up(PAYER)
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


# Supervision: what a hostile operator did to `kessai up`. Each test reads the process tree of
# the `kessai up` it started (Linux /proc), kills one process with SIGKILL and checks what a
# user would notice: the screen, the APIs, and what is left running.

log = logging.getLogger(__name__)

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the process tree from /proc"
)

_MODULES = {
    b"command_service": "command-api",
    b"command_service.relay": "relay",
    b"projector": "projector",
    b"rewards": "rewards",
    b"query_service": "query-api",
    b"reconciler": "reconciler",
}


def _children(parent: int) -> dict[str, int]:
    """The live processes ``kessai up`` started, by component."""
    found: dict[str, int] = {}
    for listing in Path(f"/proc/{parent}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in listing.read_text().split():
                with contextlib.suppress(OSError):
                    # A child that died and is not yet reaped has an empty command line.
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"-m" in argv[:-1]:
                        name = _MODULES.get(argv[argv.index(b"-m") + 1])
                        if name:
                            found[name] = int(pid)
                    elif b"tansu" in Path(argv[0].decode()).name.encode():
                        found["broker"] = int(pid)
    return found


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(condition: Callable[[], object], within: float, what: str) -> float:
    """Poll until ``condition`` holds; return how long it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"{what}: not within {within} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _kill_and_see_restarted(system: RunningSystem, name: str) -> int:
    """SIGKILL one child; wait until the screen says it was restarted and the new process
    runs. The screen must also have said which child died, of what, when it would restart
    and where its log is. Returns the new pid."""
    old = _children(system.process.pid)[name]
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        new = _children(system.process.pid).get(name, old)
        return new != old and f"{name} restarted (pid {new})" in system.screen.read_text()

    seconds = _wait(restarted, within=20, what=f"{name} restarted")
    log.info("%s: said restarted %.2f s after the SIGKILL", name, seconds)
    said = [
        line
        for line in system.screen.read_text().splitlines()
        if name in line and "SIGKILL" in line and "restart" in line and f"{name}.log" in line
    ]
    assert said, system.screen.read_text()
    return _children(system.process.pid)[name]


class _Payer:
    """Pays continuously from a thread (balance payments by ``PAYER``: top the wallet up
    first) and keeps every answer of the command API."""

    def __init__(self, system: RunningSystem) -> None:
        self.system = system
        self.answers: list[int | str] = []
        self.versions: dict[str, tuple[int, int]] = {}
        """payment_id -> (version, refunded_amount) as the command API last answered."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pay, daemon=True)

    def __enter__(self) -> _Payer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _pay(self) -> None:
        with httpx.Client(
            base_url=self.system.api, timeout=10, headers=self.system.auth("payments")
        ) as client:
            while not self._stop.wait(0.05):
                try:
                    answer = client.post(
                        "/v1/payments",
                        json=payment_body(merchant_id="shop-2"),
                        headers={"Idempotency-Key": new_key()},
                    )
                    self.answers.append(answer.status_code)
                    if answer.status_code == 201:
                        self._remember(answer.json())
                    # Every third payment gets a refund: its events must reach the read side
                    # in order too.
                    if answer.status_code == 201 and len(self.versions) % 3 == 0:
                        refund = client.post(
                            f"/v1/payments/{answer.json()['payment_id']}/refunds",
                            json={"amount": 100},
                            headers={"Idempotency-Key": new_key()},
                        )
                        self.answers.append(refund.status_code)
                        if refund.status_code == 201:
                            self._remember(refund.json())
                except httpx.TransportError as exc:
                    self.answers.append(repr(exc))

    def _remember(self, answer: dict[str, Any]) -> None:
        self.versions[answer["payment_id"]] = (answer["version"], answer["refunded_amount"])

    def shown(self) -> dict[str, tuple[int, int]]:
        """payment_id -> (version, refunded_amount) as the query API lists them (one page of
        the merchant's list: one request, under the query API's per-key rate limit)."""
        listed = httpx.get(
            f"{self.system.query}/v1/merchants/shop-2/payments",
            params={"limit": 500},
            headers=self.system.auth("merchant"),
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        items = listed.json()["items"]
        assert len(items) < 500, "more payments than one page: list them in pages"
        return {item["payment_id"]: (item["version"], item["refunded_amount"]) for item in items}


def _pay_and_see_it_listed(system: RunningSystem, within: float = 30) -> float:
    """One payment through the command API (by ``PAYER``, whose wallet holds the money);
    how long until the query API shows it."""
    created = httpx.post(
        f"{system.api}/v1/payments",
        json=payment_body(merchant_id="shop-1"),
        headers={**system.auth("payments"), "Idempotency-Key": new_key()},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    url = f"{system.query}/v1/payments/{created.json()['payment_id']}"
    return _wait(
        lambda: httpx.get(url, headers=system.auth("merchant"), timeout=5).status_code == 200,
        within=within,
        what="the payment on the query API",
    )


@linux_only
def test_killed_children_are_restarted_while_the_payment_api_keeps_serving(
    embedded: RunningSystem,
) -> None:
    system = embedded
    assert set(_children(system.process.pid)) == {
        "broker", "command-api", "relay", "projector", "rewards", "query-api", "reconciler",
    }  # fmt: skip
    system.top_up(PAYER)  # whom _Payer and _pay_and_see_it_listed pay from
    with _Payer(system) as payer:
        _kill_and_see_restarted(system, "projector")
        log.info("a payment reached the query API %.2f s later", _pay_and_see_it_listed(system))
    assert payer.answers, "no payment was attempted"
    assert set(payer.answers) == {201}, Counter(payer.answers)

    _kill_and_see_restarted(system, "command-api")
    serving = _wait(
        lambda: _answers(f"{system.api}/readyz") == 200, within=30, what="command API back"
    )
    log.info("command API ready again %.2f s after its new process appeared", serving)
    _pay_and_see_it_listed(system)
    assert system.process.poll() is None


def _answers(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.TransportError:
        return None


@linux_only
def test_a_killed_broker_comes_back_on_its_port_with_its_partitions(
    embedded: RunningSystem,
) -> None:
    system = embedded
    system.top_up(PAYER)  # whom _Payer and _pay_and_see_it_listed pay from
    with _Payer(system) as payer:
        _kill_and_see_restarted(system, "broker")
        _wait(lambda: port_is_open("127.0.0.1", system.broker_port), 10, "broker listening")
        partitions = asyncio.run(_partitions(system.bootstrap, DEFAULT_TOPIC))
        assert partitions == Settings.model_fields["topic_partitions"].default
        seen = _pay_and_see_it_listed(system, within=45)
        log.info("a payment reached the query API %.2f s after the broker was back", seen)
        time.sleep(1)  # a little more load on the new log
    assert set(payer.answers) == {201}, Counter(payer.answers)
    # Every payment and refund made before, during and after the broker's death reaches the
    # read side, without a reconciliation (kessai up's reconciler ran once, at start, before the
    # kill; its next run is minutes away).
    started = time.monotonic()
    while (shown := payer.shown()) != payer.versions:
        differing = {p: (v, shown.get(p)) for p, v in payer.versions.items() if shown.get(p) != v}
        assert time.monotonic() - started < 30, (
            f"{len(differing)} of {len(payer.versions)} payments not shown as answered within "
            f"30 s (answered, shown): {list(differing.items())[:5]}"
        )
        time.sleep(0.5)
    log.info(
        "%d payments all shown as answered %.2f s later",
        len(payer.versions),
        time.monotonic() - started,
    )


async def _partitions(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


@linux_only
def test_sigkill_of_kessai_up_takes_every_child_along(embedded: RunningSystem) -> None:
    system = embedded
    # The warning a user must see is on the screen, not only in a log.
    _wait(
        lambda: any(
            "KESSAI_ACQUIRER_URL" in line and "card payments" in line
            for line in system.screen.read_text().splitlines()
        ),
        within=10,
        what="the card payments warning on the screen",
    )
    children = _children(system.process.pid)
    assert len(children) == 7, children
    ports = [int(url.rsplit(":", 1)[1]) for url in (system.api, system.query)]
    ports.append(system.broker_port)

    system.process.kill()
    system.process.wait()
    try:
        gone = _wait(
            lambda: (
                not any(_alive(pid) for pid in children.values())
                and not any(port_is_open("127.0.0.1", port) for port in ports)
            ),
            within=5,
            what=f"children {children} gone and ports {ports} closed",
        )
        log.info("every child gone and every port closed %.2f s after the SIGKILL", gone)
    finally:
        for pid in children.values():  # orphans of a failed run must not outlive the test
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@linux_only
def test_a_stop_while_a_child_waits_for_its_restart_restarts_nothing(
    embedded: RunningSystem,
) -> None:
    system = embedded
    children = _children(system.process.pid)
    os.kill(children["projector"], signal.SIGKILL)
    _wait(
        lambda: "projector was killed by SIGKILL" in system.screen.read_text(),
        within=5,
        what="the projector's death on the screen",
    )
    before_stop = len(system.screen.read_bytes())
    system.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert system.process.wait(timeout=STOP_SECONDS + 5) == 0
    after_stop = system.screen.read_bytes()[before_stop:].decode()
    assert "restarted" not in after_stop, after_stop
    assert after_stop.rstrip().endswith("stopped"), after_stop
    assert not [pid for pid in children.values() if _alive(pid)]


def test_a_taken_port_is_one_clear_sentence_and_nothing_starts(tmp_path: Path) -> None:
    api_port, query_port, broker_port = free_port(), free_port(), free_port()
    with socket.socket() as query_holder, socket.socket() as broker_holder:
        for holder, port in ((query_holder, query_port), (broker_holder, broker_port)):
            holder.bind(("127.0.0.1", port))
            holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "kessai_cli", "up"],
            env=_env(tmp_path, api_port, query_port, broker_port),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    screen = done.stdout.decode() + done.stderr.decode()
    assert done.returncode != 0, screen
    assert "Traceback" not in screen
    for port, setting in (
        (query_port, "KESSAI_QUERY_API_PORT"),
        (broker_port, "KESSAI_EMBEDDED_BROKER_PORT"),
    ):
        (line,) = [line for line in screen.splitlines() if f"port {port}" in line]
        assert setting in line, line
        assert f"ss -ltnp 'sport = :{port}'" in line, line
    assert not list((tmp_path / "home").glob("*.db")), "something was started (migrated)"
