"""Card payments and the acquirer: authorization before capture, the timeout, the bulkhead, the
circuit breaker and idempotency, against an acquirer double that speaks real HTTP on 127.0.0.1.

Every test runs on SQLite and on MySQL/MariaDB (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from command_service.app import create_app
from kessai.auth import PAYMENTS_WRITE
from kessai.events import PaymentCaptured, parse_event
from kessai.schema.write import events
from kessai.settings import Settings
from tests.helpers import (
    PAYER,
    api_key,
    bearer,
    count_rows,
    fund,
    new_key,
    payment_body,
    until_true,
)
from tests.integration.command_api import rows_added

PAYMENTS = "/v1/payments"
TIMEOUT_S = 0.3  # KESSAI_ACQUIRER_TIMEOUT_MS of these tests
RESET_S = 0.5  # KESSAI_ACQUIRER_BREAKER_RESET_SECONDS


# --- the acquirer double ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    authorization_id: str
    status: str
    body: dict[str, Any]


class AcquirerDouble:
    """An acquirer over HTTP (``http.server`` in a thread) that the test makes approve,
    decline, fail (HTTP 500) or hang (no answer until released), optionally answering only
    after ``delay`` seconds (the authorization is made, the answer comes late).

    Like a real acquirer it is idempotent: a repeated Idempotency-Key gets the first answer
    again (a different body under that key is 422). It records every request, and every
    authorization it issued, by Idempotency-Key."""

    def __init__(self) -> None:
        self.mode = "approve"
        self.delay = 0.0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.requests: list[tuple[str | None, dict[str, Any]]] = []
        self.issued: dict[str, Issued] = {}
        self.by_id: dict[str, Issued] = {}
        self.hanging = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def hang(self) -> None:
        with self._lock:
            self._release.clear()
            self.mode = "hang"

    def recover(self, mode: str = "approve") -> None:
        """Answer again (``mode``), and let every hanging request go."""
        with self._lock:
            self.mode = mode
            self.delay = 0.0
        self._release.set()

    def requests_for(self, reference: str) -> list[str | None]:
        """The Idempotency-Keys of the requests received for one payment reference."""
        with self._lock:
            return [key for key, body in self.requests if body.get("reference") == reference]

    def answer(self, path: str, key: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": "malformed JSON"}
        with self._lock:
            self.requests.append((key, body))
            mode, delay = self.mode, self.delay
        if path != "/authorizations" or not key:
            return 400, {"error": "POST /authorizations with an Idempotency-Key"}
        if mode == "fail":
            return 500, {"error": "internal"}
        if mode == "hang":
            with self._lock:
                self.hanging += 1
            try:
                self._release.wait(timeout=30)
            finally:
                with self._lock:
                    self.hanging -= 1
            return 503, {"error": "was hanging"}
        with self._lock:
            known = self.issued.get(key)
            if known is not None and known.body != body:
                return 422, {"error": "Idempotency-Key reused for another request"}
            status = 200
            if known is None:
                known = Issued(
                    f"auth_{uuid.uuid4().hex[:16]}",
                    "declined" if mode == "decline" else "approved",
                    body,
                )
                self.issued[key] = known
                self.by_id[known.authorization_id] = known
                status = 201
        if delay:
            time.sleep(delay)
        return status, {"authorization_id": known.authorization_id, "status": known.status}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        double: AcquirerDouble = self.server.double  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, answer = double.answer(self.path, self.headers.get("Idempotency-Key"), raw)
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (its timeout): nobody listens any more
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def acquirer() -> Iterator[AcquirerDouble]:
    double = AcquirerDouble()
    double.start()
    yield double
    double.stop()


def card_settings(settings: Settings, double: AcquirerDouble, **overrides: Any) -> Settings:
    return settings.model_copy(
        update={
            "acquirer_url": double.url,
            "acquirer_timeout_ms": int(TIMEOUT_S * 1000),
            "acquirer_max_concurrency": 4,
            "acquirer_max_attempts": 2,
            "acquirer_breaker_failures": 4,
            "acquirer_breaker_reset_seconds": RESET_S,
            **overrides,
        }
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The command API in process, behind a client with the headers of the ``api`` fixture."""
    app = create_app(settings)
    key = api_key(settings, PAYMENTS_WRITE)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://command.test",
            headers=bearer(key),
        ) as client,
    ):
        yield app, client


@pytest.fixture
async def card_api(
    settings: Settings, acquirer: AcquirerDouble
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running(card_settings(settings, acquirer)) as pair:
        yield pair


def card_body(reference: str, **overrides: Any) -> dict[str, Any]:
    """A card payment whose ``order_ref`` (sent to the acquirer as ``reference``) names it."""
    return payment_body(method="card", order_ref=reference, **overrides)


async def pay(api: httpx.AsyncClient, body: dict[str, Any], key: str) -> httpx.Response:
    return await api.post(PAYMENTS, json=body, headers={"Idempotency-Key": key})


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def captured_events(engine: Engine) -> list[PaymentCaptured]:
    with engine.connect() as conn:
        bodies = conn.execute(sa.select(events.c.body).where(events.c.version == 1)).scalars()
        parsed = [parse_event(body) for body in bodies]
    return [e for e in parsed if isinstance(e, PaymentCaptured)]


def assert_every_card_capture_authorized(engine: Engine, double: AcquirerDouble) -> int:
    """No card payment is captured without an approval the acquirer issued for that very
    request, no approval is captured twice, and no payment was authorized twice.
    Returns how many card payments were captured."""
    cards = [e for e in captured_events(engine) if e.payload.method == "card"]
    for event in cards:
        authorization_id = event.payload.authorization_id
        assert authorization_id is not None, f"card payment {event.payment_id} not authorized"
        issued = double.by_id[authorization_id]
        assert issued.status == "approved"
        assert issued.body == {
            "amount": event.payload.amount,
            "currency": event.payload.currency,
            "merchant_id": event.merchant_id,
            "reference": event.payload.order_ref,
        }
    used = [e.payload.authorization_id for e in cards]
    assert len(used) == len(set(used)), "an authorization was captured twice"
    per_reference: dict[str, set[str]] = defaultdict(set)
    for issued in double.issued.values():
        per_reference[issued.body["reference"]].add(issued.authorization_id)
    twice = {ref: ids for ref, ids in per_reference.items() if len(ids) > 1}
    assert not twice, f"authorized more than once: {twice}"
    return len(cards)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def breaker_state(api: httpx.AsyncClient) -> str:
    response = await api.get("/metrics")
    assert response.status_code == 200
    found = samples(response.text)
    states = [
        state
        for state in ("closed", "open", "half_open")
        if found[("kessai_acquirer_circuit_state", frozenset({("state", state)}))] == 1
    ]
    assert len(states) == 1, states
    return states[0]


# --- authorization before capture ------------------------------------------------------------


async def test_a_card_payment_is_captured_with_the_authorization_the_acquirer_issued(
    card_api: tuple[FastAPI, httpx.AsyncClient], acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    _, api = card_api
    fund(write_engine, PAYER)  # for the balance payment at the end
    before = count_rows(write_engine)
    key = new_key("card")
    body = card_body(key, amount=1500, merchant_id="shop-1")

    first = await pay(api, body, key)

    assert first.status_code == 201, first.text
    assert first.json()["method"] == "card"
    ((acquirer_key, sent),) = acquirer.requests
    assert acquirer_key is not None
    assert len(acquirer_key) == 64  # derived from client, key and request; not the key itself
    assert key not in acquirer_key
    assert sent == {"amount": 1500, "currency": "JPY", "merchant_id": "shop-1", "reference": key}
    (event,) = captured_events(write_engine)
    assert str(event.payment_id) == first.json()["payment_id"]
    assert event.payload.authorization_id == acquirer.issued[acquirer_key].authorization_id
    # A card payment moves no wallet: its event, its outbox row, its key.
    assert rows_added(write_engine, before) == {"events": 1, "outbox": 1, "idempotency_keys": 1}

    # A replay answers from the store: the acquirer is not asked again.
    again = await pay(api, body, key)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    # Another body under the key is refused before the acquirer is asked.
    error_of(await pay(api, {**body, "amount": 1600}, key), 422, "idempotency_key_reused")
    # Balance payments never call it, and their events carry no authorization.
    balance = await pay(api, payment_body(amount=700), new_key())
    assert balance.status_code == 201, balance.text
    assert len(acquirer.requests) == 1
    with write_engine.connect() as conn:
        raw = conn.execute(
            sa.select(events.c.body).where(
                events.c.payment_id == uuid.UUID(balance.json()["payment_id"])
            )
        ).scalar_one()
    assert "authorization_id" not in json.loads(raw)["payload"]

    assert assert_every_card_capture_authorized(write_engine, acquirer) == 1
    metrics = samples((await api.get("/metrics")).text)
    approved = frozenset({("outcome", "approved")})
    assert metrics[("kessai_acquirer_request_duration_seconds_count", approved)] == 1
    assert metrics[("kessai_acquirer_in_flight", frozenset())] == 0


async def test_a_decline_is_a_recorded_402_that_captures_nothing(
    card_api: tuple[FastAPI, httpx.AsyncClient], acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    _, api = card_api
    acquirer.mode = "decline"
    key = new_key("declined")
    body = card_body(key)

    declined = await pay(api, body, key)

    error = error_of(declined, 402, "card_declined")
    (issued,) = acquirer.issued.values()
    assert error["details"] == {"authorization_id": issued.authorization_id}
    assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 1}

    # A decline is a final answer: replayed for the key, even once the card would pass.
    acquirer.mode = "approve"
    again = await pay(api, body, key)
    assert again.status_code == 402
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == declined.content
    assert len(acquirer.requests) == 1
    # A new attempt is a new request with a new key.
    other = new_key("retry")
    assert (await pay(api, card_body(other), other)).status_code == 201
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 2}
    assert assert_every_card_capture_authorized(write_engine, acquirer) == 1


async def test_no_answer_captures_nothing_and_the_retry_captures_the_one_authorization(
    settings: Settings, acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    """5xx and timeouts: 503, nothing recorded (the key neither); the client's retry with the
    same key gets the authorization the acquirer made while kessai was no longer listening."""
    patient = card_settings(settings, acquirer, acquirer_breaker_failures=100)
    async with running(patient) as (_, api):
        key = new_key("unanswered")
        body = card_body(key)

        acquirer.mode = "fail"
        failed = await pay(api, body, key)
        error = error_of(failed, 503, "acquirer_unavailable")
        assert error["details"] == {"reason": "error"}
        assert failed.headers["Retry-After"] == "1"
        sent = acquirer.requests_for(key)
        assert len(sent) == 2  # retried once (KESSAI_ACQUIRER_MAX_ATTEMPTS=2), same key
        assert len(set(sent)) == 1

        acquirer.mode, acquirer.delay = "approve", TIMEOUT_S * 2  # authorized, answered late
        started = time.monotonic()
        late = await pay(api, body, key)
        elapsed = time.monotonic() - started
        assert error_of(late, 503, "acquirer_unavailable")["details"] == {"reason": "timeout"}
        assert elapsed < 2 * TIMEOUT_S + 1.0  # two attempts of at most the timeout each
        assert count_rows(write_engine) == {"events": 0, "outbox": 0, "idempotency_keys": 0}
        (issued,) = acquirer.issued.values()  # the acquirer did authorize, once

        acquirer.delay = 0.0
        retried = await pay(api, body, key)
        assert retried.status_code == 201, retried.text
        assert "Idempotent-Replayed" not in retried.headers
        (event,) = captured_events(write_engine)
        assert event.payload.authorization_id == issued.authorization_id
        assert len(set(acquirer.requests_for(key))) == 1
        assert len(acquirer.issued) == 1
        replay = await pay(api, body, key)
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert len(acquirer.requests_for(key)) == 5  # 2 failed, 2 late, 1 approved: no more
        assert assert_every_card_capture_authorized(write_engine, acquirer) == 1


async def test_concurrent_retries_of_one_card_payment_authorize_and_capture_once(
    card_api: tuple[FastAPI, httpx.AsyncClient], acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    _, api = card_api
    acquirer.delay = 0.1  # the first request is still at the acquirer when the others arrive
    key = new_key("impatient")
    body = card_body(key)

    responses = await asyncio.gather(*(pay(api, body, key) for _ in range(8)))
    responses.append(await pay(api, body, key))

    statuses = [(r.status_code, r.headers.get("Idempotent-Replayed")) for r in responses]
    assert statuses.count((201, None)) == 1, statuses
    assert set(statuses) <= {(201, None), (201, "true"), (409, None)}
    assert statuses[-1] == (201, "true")
    assert len(acquirer.requests_for(key)) == 1
    assert count_rows(write_engine) == {"events": 1, "outbox": 1, "idempotency_keys": 1}
    assert assert_every_card_capture_authorized(write_engine, acquirer) == 1


async def test_without_an_acquirer_card_payments_are_refused_and_balance_works(
    api: httpx.AsyncClient, write_engine: Engine
) -> None:
    """KESSAI_ACQUIRER_URL unset (the ``api`` fixture): never capture a card unauthorized."""
    before = count_rows(write_engine)  # the api fixture's top-up of the payer
    key = new_key()
    refused = await pay(api, card_body(key), key)

    assert error_of(refused, 503, "acquirer_unavailable")["details"] == {"reason": "not_configured"}
    assert rows_added(write_engine, before) == {"events": 0, "outbox": 0, "idempotency_keys": 0}
    assert (await pay(api, payment_body(), new_key())).status_code == 201


# --- the circuit breaker ---------------------------------------------------------------------


@pytest.mark.slow
async def test_the_breaker_opens_fails_fast_then_probes_once_and_closes(
    settings: Settings, acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    reset = 1.5  # long enough to see "open" again after a probe on a busy machine
    fund(write_engine, PAYER)  # for the balance payment made while the breaker is open
    slow_reset = card_settings(settings, acquirer, acquirer_breaker_reset_seconds=reset)
    async with running(slow_reset) as (app, api):
        await _breaker_scenario(app, api, acquirer, reset)
    assert assert_every_card_capture_authorized(write_engine, acquirer) == 4
    assert count_rows(write_engine)["events"] == 5  # 4 card payments, 1 balance payment


async def _breaker_scenario(
    app: FastAPI, api: httpx.AsyncClient, acquirer: AcquirerDouble, reset: float
) -> None:
    assert await breaker_state(api) == "closed"

    # Failing acquirer: 4 failed calls (2 requests of 2 attempts) open the breaker.
    acquirer.mode = "fail"
    for _ in range(2):
        key = new_key("failing")
        error = error_of(await pay(api, card_body(key), key), 503, "acquirer_unavailable")
        assert error["details"] == {"reason": "error"}
    assert await breaker_state(api) == "open"
    calls = len(acquirer.requests)
    assert calls == 4

    # Open: card payments fail at once without calling the acquirer; balance is untouched.
    for _ in range(5):
        key = new_key("fast")
        started = time.monotonic()
        refused = await pay(api, card_body(key), key)
        assert time.monotonic() - started < TIMEOUT_S
        assert error_of(refused, 503, "acquirer_unavailable")["details"] == {
            "reason": "circuit_open"
        }
        assert 1 <= int(refused.headers["Retry-After"]) <= 1 + reset
    assert (await pay(api, payment_body(), new_key())).status_code == 201
    assert len(acquirer.requests) == calls
    metrics = samples((await api.get("/metrics")).text)
    assert metrics[("kessai_acquirer_rejected_total", frozenset({("reason", "circuit_open")}))] == 5

    # Half-open against a hanging acquirer: one probe goes through, the others fail at once;
    # the probe's timeout opens the breaker again.
    acquirer.hang()
    await until_true(lambda: app.state.resources.acquirer.breaker_state == "half_open")
    assert await breaker_state(api) == "half_open"
    keys = [new_key("probe") for _ in range(5)]
    probes = await asyncio.gather(*(pay(api, card_body(k), k) for k in keys))
    for response in probes:
        error_of(response, 503, "acquirer_unavailable")
    assert len(acquirer.requests) == calls + 1
    assert await breaker_state(api) == "open"

    # The acquirer recovers: the next probe succeeds and closes the breaker.
    acquirer.recover()
    await until_true(lambda: app.state.resources.acquirer.breaker_state == "half_open")
    key = new_key("recovered")
    assert (await pay(api, card_body(key), key)).status_code == 201
    assert await breaker_state(api) == "closed"
    for _ in range(3):
        key = new_key("after")
        assert (await pay(api, card_body(key), key)).status_code == 201


# --- a hanging acquirer ----------------------------------------------------------------------


async def balance_latencies(api: httpx.AsyncClient, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = await pay(api, payment_body(), new_key("balance"))
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 201, response.text
    return latencies


@pytest.mark.slow
async def test_a_hanging_acquirer_leaves_balance_payments_and_workers_alone(
    settings: Settings, acquirer: AcquirerDouble, write_engine: Engine
) -> None:
    """While every acquirer call hangs, card payments time out or find the bulkhead full,
    balance payments keep their latency, and no card payment holds a worker thread; when the
    hang ends nothing is left in flight and the API answers at once."""
    hung_settings = card_settings(
        settings,
        acquirer,
        acquirer_timeout_ms=500,
        acquirer_max_attempts=1,
        acquirer_breaker_failures=1_000,  # keep calling the hanging acquirer: the bulkhead's turn
    )
    fund(write_engine, PAYER)  # for the balance payments timed before, during and after
    async with running(hung_settings) as (app, api):
        await balance_latencies(api, 5)  # warm-up
        baseline = await balance_latencies(api, 30)

        acquirer.hang()
        stop = asyncio.Event()
        answers: list[httpx.Response] = []

        async def card_traffic() -> None:
            while not stop.is_set():
                key = new_key("hung")
                answers.append(await pay(api, card_body(key), key))

        acquirer_client = app.state.resources.acquirer
        limiter = app.state.resources.limiter
        observed: list[int] = []  # acquirer calls in flight, sampled

        async def observe() -> None:
            while not stop.is_set():
                observed.append(acquirer_client.in_flight)
                await asyncio.sleep(0.005)

        traffic = [asyncio.create_task(card_traffic()) for _ in range(12)]
        traffic.append(asyncio.create_task(observe()))
        try:
            # The bulkhead is full of hanging calls, eight more card payments wait for a
            # slot, and not one of them holds a worker thread (or a database connection).
            await until_true(
                lambda: acquirer_client.in_flight == 4 and limiter.borrowed_tokens == 0
            )
            during = await balance_latencies(api, 30)
            assert acquirer.hanging >= 1, "the hang was over before the measurement ended"
        finally:
            # Card payments still waiting end by their timeout, the acquirer still hanging.
            stop.set()
            await asyncio.wait_for(asyncio.gather(*traffic), timeout=10)

        base, hung = statistics.median(baseline), statistics.median(during)
        assert hung < 3 * base + 0.02, f"median {hung * 1000:.1f} ms vs {base * 1000:.1f} ms"
        assert max(observed) <= 4  # the bulkhead held
        assert answers, "no card payment finished during the hang"
        for response in answers:
            error = error_of(response, 503, "acquirer_unavailable")
            assert error["details"]["reason"] in {"timeout", "busy"}, error
        # Nothing left behind: no call in flight, no key held, no thread taken.
        assert acquirer_client.in_flight == 0
        assert app.state.resources.in_flight == set()
        assert limiter.borrowed_tokens == 0

        # The hang ends: the API answers at once, card payments included.
        acquirer.recover()
        assert (await balance_latencies(api, 1))[0] < 1.0
        key = new_key("after-hang")
        started = time.monotonic()
        assert (await pay(api, card_body(key), key)).status_code == 201
        assert time.monotonic() - started < 1.0
    assert assert_every_card_capture_authorized(write_engine, acquirer) == 1
