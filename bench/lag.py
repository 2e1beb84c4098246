"""The rest of the pipeline behind the command API, for ``bench.writes``: how fast payments
become visible to merchants while the command API takes campaign traffic.

- ``Pipeline`` starts a private embedded broker (the topic created as ``kessai up`` does), and
  the relay, the projector and the query API as subprocesses over the bench's own databases.
- ``Prober`` measures end-to-end lag the way a merchant would see it: during the run it
  captures a balance payment of its own merchant (from its own funded payers) at a steady rate
  through the same command API and polls ``GET /v1/payments/{id}`` on the query API until the
  payment is there. The lag of a
  probe is the time from the command API's 201 to the first 200 of the query API (so it
  includes up to one poll interval).
- ``AppliedCounter`` samples how many payments the read database holds, for applied/s and
  for the time the read side needs to catch up once the load stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.serving import Served, served
from bench.stores import Stores
from kessai.broker import EmbeddedBroker, ensure_topic, free_port
from kessai.settings import Settings
from kessai_cli import loadgen

PROBE_MERCHANT = "m-probe"
"""The probes' merchant: not one of the load generator's (``shop-1``...)."""
PROBE_PAYERS = tuple(f"probe-{n}" for n in range(50))
"""Who pays the probes, in turn: not the load generator's payers (``u0``...). Fund them first
(``bench.drive.fund_payers``): a probe refused with 402 measures nothing."""


@dataclass
class Pipeline:
    """Broker, relay, projector and query API for one bench run; ``stop`` ends them all."""

    broker: EmbeddedBroker
    processes: dict[str, Any] = field(default_factory=dict)
    query_url: str = ""

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        env: dict[str, str],
        home: Path,
        services: tuple[str, ...] = ("relay", "projector"),
        query_api: bool = True,
    ) -> Iterator[Pipeline]:
        """``env`` holds the databases' settings; the services' logs go to ``home``. The
        ``services`` (``kessai`` commands without a port) and the query API run unless left
        out."""
        broker = EmbeddedBroker(free_port(), log_path=home / "broker.log")
        broker.start()
        pipeline = cls(broker)
        try:
            env = {**env, "KESSAI_KAFKA_BOOTSTRAP": broker.bootstrap}
            # The services see no KESSAI_TOPIC* of this shell (``env`` is the bench's own).
            fields = Settings.model_fields
            asyncio.run(
                ensure_topic(
                    broker.bootstrap,
                    env.get("KESSAI_TOPIC", fields["topic"].default),
                    partitions=int(
                        env.get("KESSAI_TOPIC_PARTITIONS", fields["topic_partitions"].default)
                    ),
                )
            )
            with contextlib.ExitStack() as stack:
                for name in services:
                    pipeline.processes[name] = stack.enter_context(
                        background([sys.executable, "-m", "kessai_cli", name], env, home, name)
                    )
                if not query_api:
                    yield pipeline
                    return
                port = free_port()
                argv = [sys.executable, "-m", "kessai_cli", "query-api", "--host", "127.0.0.1"]
                argv += ["--port", str(port)]
                query = stack.enter_context(served(argv, env, port, home / "query-api.log"))
                pipeline.processes["query-api"] = query
                pipeline.query_url = query.url
                yield pipeline
        finally:
            broker.stop()


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], home: Path, name: str) -> Iterator[Any]:
    """A service without an HTTP port (relay, projector), stopped at the end of the block."""
    server = Served(argv, env, 0, home / f"{name}.log")
    try:
        time.sleep(0.2)
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited: {server.log.read_text()[-2000:]}")
        yield server
    finally:
        server.stop()


@dataclass
class Probes:
    lags: list[float] = field(default_factory=list)
    """Seconds from the 201 to the first 200 of the query API, one per probe that arrived."""
    sent: int = 0
    refused: int = 0
    """Probes the command API did not answer with 201."""
    not_seen: int = 0
    """Probes not visible within the timeout."""
    polls: int = 0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.lags)

        def pct(q: float) -> float | None:
            if not ordered:
                return None
            return round(
                ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1e3, 1
            )

        return {
            "probes": self.sent,
            "seen": len(ordered),
            "refused": self.refused,
            "not_seen_within_timeout": self.not_seen,
            "query_polls": self.polls,
            "lag_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        }


class Prober:
    """Captures a payment every ``interval`` seconds and times until the query API shows it."""

    def __init__(
        self,
        command_url: str,
        write_key: str,
        query_url: str,
        read_key: str,
        *,
        interval: float = 0.05,
        poll: float = 0.01,
        timeout: float = 30.0,
    ) -> None:
        self.command, self.query = urlsplit(command_url), urlsplit(query_url)
        self.write_key, self.read_key = write_key, read_key
        self.interval, self.poll, self.timeout = interval, poll, timeout
        self.probes = Probes()

    async def run(self, seconds: float) -> Probes:
        """Probe for ``seconds``, then wait for the probes still in flight."""
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            tasks.append(asyncio.create_task(self._probe(len(tasks))))
            await asyncio.sleep(max(0.0, start + len(tasks) * self.interval - now))
        await asyncio.gather(*tasks)
        return self.probes

    async def _probe(self, index: int) -> None:
        self.probes.sent += 1
        write = loadgen.Connection(self.command.hostname or "", self.command.port or 80, False, 30)
        read = loadgen.Connection(self.query.hostname or "", self.query.port or 80, False, 30)
        try:
            body = orjson.dumps(
                {
                    "merchant_id": PROBE_MERCHANT,
                    "user_id": PROBE_PAYERS[index % len(PROBE_PAYERS)],
                    "amount": 100 + index,
                    "method": "balance",
                }
            )
            head = (
                f"POST /v1/payments HTTP/1.1\r\nHost: {self.command.netloc}\r\n"
                f"Authorization: Bearer {self.write_key}\r\nContent-Type: application/json\r\n"
                f"Idempotency-Key: probe-{uuid.uuid4().hex}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            try:
                answer = await write.request(head, body)
            except loadgen.HttpError:
                self.probes.refused += 1
                return
            if answer.status != 201:
                self.probes.refused += 1
                return
            answered = time.perf_counter()
            payment_id = orjson.loads(answer.body)["payment_id"]
            get = (
                f"GET /v1/payments/{payment_id} HTTP/1.1\r\nHost: {self.query.netloc}\r\n"
                f"Authorization: Bearer {self.read_key}\r\n\r\n"
            ).encode()
            while time.perf_counter() - answered < self.timeout:
                self.probes.polls += 1
                with contextlib.suppress(loadgen.HttpError):
                    if (await read.request(get, b"")).status == 200:
                        self.probes.lags.append(time.perf_counter() - answered)
                        return
                await asyncio.sleep(self.poll)
            self.probes.not_seen += 1
        finally:
            write.close()
            read.close()


class AppliedCounter:
    """Counts the read database's payments every ``every`` seconds in a thread."""

    def __init__(self, stores: Stores, read_db: str, every: float = 0.25) -> None:
        self.stores, self.read_db, self.every = stores, read_db, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="applied-counter", daemon=True)

    def __enter__(self) -> AppliedCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with self.stores.cursor(self.read_db) as (conn, cursor):
            while not self._stop.is_set():
                cursor.execute("SELECT COUNT(*) FROM payments")
                row = cursor.fetchone()
                conn.commit()  # a fresh snapshot next time
                self.samples.append((time.perf_counter(), int(row[0]) if row else 0))
                self._stop.wait(self.every)

    def count_at(self, moment: float) -> int:
        """The count of the last sample taken at or before ``moment``."""
        before = [count for at, count in self.samples if at <= moment]
        return before[-1] if before else 0

    def wait_for(self, count: int, timeout: float) -> float | None:
        """Seconds until the read database holds ``count`` payments, or None on timeout."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.samples and self.samples[-1][1] >= count:
                return time.perf_counter() - start
            time.sleep(self.every / 2)
        return None
