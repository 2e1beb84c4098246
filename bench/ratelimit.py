"""The per-key write limit under 512 connections: does 300/s admit at most 300/s?

``python -m bench.ratelimit [--limit 300] [--connections 512] [--seconds 10] [--workers 2]
[--users 10000] [--redis-url redis://127.0.0.1:6379/0] [--db-url
mysql+pymysql://root@127.0.0.1:3306 | --db-url sqlite] [--json out.json]``

1. Creates fresh databases, a ``payments:write`` key and a ``wallets:write`` key as
   ``bench/writes.py`` does.
2. Capacity: serves the real command API (``kessai command-api --workers N``) with every rate
   limit and the load shedder out of the way, and drives it closed loop over ``--connections``
   keep-alive connections for ``--seconds`` (after ``--warmup``): balance payments by
   ``--users`` payers, each with its own Idempotency-Key. Answers 2xx per second. Before the
   warm-up it tops up every payer's wallet (``bench.drive.fund_payers``), so no payment is
   402 and every answer but a 429 is one the limit let through to be recorded.
3. Limited: the same API on the same databases with ``KESSAI_RATE_LIMIT_WRITES=<limit>/second``
   and its counters in Redis (``--redis-url``; shared by the worker processes, as in
   production), the shedder still out of the way so every request reaches the limit, driven
   the same way. The key is new, so its counters start empty.
4. Reports the requests the limit let through (every answer but 429) per second, against the
   limit (the ratio) and against the capacity of step 2, the most let through in any one
   second of the client's clock, and the share of refusals that are 429 with ``Retry-After``
   and ``RateLimit-Remaining: 0``. Drops the databases.

The limit is a sliding window counter (``kessai/ratelimit.py``): over any span of t seconds a
key gets at most limit x (t + 1), so a run of t seconds may let through up to limit x (t + 1) /
t per second on average (1.1 x the limit over 10 s), and up to twice the limit in one second.
Against a server that cannot serve the limit at all (capacity below it) the figure says
nothing: the report says so (``vacuous``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
import typer
from rich.table import Table

from bench.drive import fund_payers
from bench.reconciler import DEFAULT_DB_URL, machine_table
from bench.serving import interrupt, served, served_env
from bench.stores import Stores, finish, prepare_stores, scratch, temporary_home
from bench.writes import console
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.broker import free_port
from kessai_cli import loadgen

UNBOUNDED = "10000"
"""``KESSAI_OVERLOAD_MAX_IN_FLIGHT`` of both servers: every request reaches the rate limit."""
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclasses.dataclass
class Tally:
    """What one closed loop saw."""

    by_status: Counter[int] = dataclasses.field(default_factory=Counter)
    passed_at: list[float] = dataclasses.field(default_factory=list)
    """Seconds since the start of every answer but 429 (the limit let the request through)."""
    limited: int = 0
    limited_actionable: int = 0
    """429s with Retry-After and RateLimit-Remaining: 0."""
    connection_errors: int = 0
    elapsed: float = 0.0

    def answered(self, status: int, headers: dict[str, str], seconds: float) -> None:
        self.by_status[status] += 1
        if status != 429:
            self.passed_at.append(seconds)
            return
        self.limited += 1
        if headers.get("retry-after") and headers.get("ratelimit-remaining") == "0":
            self.limited_actionable += 1

    def figures(self) -> dict[str, Any]:
        elapsed = self.elapsed or 1.0
        ok = sum(v for k, v in self.by_status.items() if 200 <= k < 300)
        per_second = Counter(int(t) for t in self.passed_at)
        return {
            "elapsed_seconds": round(self.elapsed, 2),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "ok_per_second": round(ok / elapsed, 1),
            "passed": len(self.passed_at),
            "passed_per_second": round(len(self.passed_at) / elapsed, 1),
            "passed_most_in_one_second": max(per_second.values(), default=0),
            "limited": self.limited,
            "limited_with_retry_after_and_remaining_0": round(
                self.limited_actionable / self.limited, 4
            )
            if self.limited
            else None,
            "connection_errors": self.connection_errors,
        }


def _payment(prefix: str, n: int, host: str, key: str, users: int) -> bytes:
    body = orjson.dumps(
        {
            "merchant_id": f"shop-{n % 50 + 1}",
            "user_id": f"u{n % users}",  # loadgen.payers: the wallets funded first
            "amount": 100 + n % 5_000,
            "currency": "JPY",
            "method": "balance",
            "order_ref": f"order-{n}",
        }
    )
    head = (
        f"POST /v1/payments HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nIdempotency-Key: {prefix}-{n}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str]]:
    writer.write(request)
    await writer.drain()
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ", 2)[1]), headers


async def closed_loop(
    url: str, key: str, connections: int, seconds: float, users: int = loadgen.USERS
) -> Tally:
    """``connections`` keep-alive connections, each sending its next payment when the last is
    answered, for ``seconds``. A plain client of its own: ``kessai_cli.loadgen`` does not keep the
    ``RateLimit-*`` headers."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally, numbers, prefix = Tally(), itertools.count(), f"rl-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    deadline = start + seconds

    async def connection() -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < deadline:
            request = _payment(prefix, next(numbers), parts.netloc, key, users)
            try:
                if streams is None:
                    streams = await asyncio.open_connection(host, port)
                async with asyncio.timeout(30):
                    status, headers = await _exchange(*streams, request)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                tally.connection_errors += 1
                if streams is not None:
                    streams[1].close()
                streams = None
                await asyncio.sleep(0.05)
                continue
            tally.answered(status, headers, time.perf_counter() - start)
        if streams is not None:
            streams[1].close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    tally.elapsed = time.perf_counter() - start
    return tally


def main(
    limit: Annotated[int, typer.Option(min=1, help="The per-key write limit, per second.")] = 300,
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 512,
    seconds: Annotated[float, typer.Option(min=1, help="Measured seconds per server.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first.")] = 2.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    users: Annotated[
        int, typer.Option(min=1, help="Payers of the traffic, their wallets funded first.")
    ] = loadgen.USERS,
    redis_url: Annotated[str, typer.Option(help="Redis for the rate-limit counters.")] = REDIS_URL,
    db_url: Annotated[
        str,
        typer.Option(help="Server URL (no database), or 'sqlite' for the embedded default."),
    ] = DEFAULT_DB_URL,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
) -> None:
    """Drive the command API with a per-key write limit through Redis, and without it."""
    signal.signal(signal.SIGTERM, interrupt)
    home = temporary_home(db_url, "kessai-bench-ratelimit-")
    stores = Stores(db_url, home)
    settings: dict[str, Any] = {"limit_per_second": limit, "connections": connections}
    settings |= {"seconds": seconds, "warmup_seconds": warmup, "workers": workers}
    settings |= {"users": users, "redis_url": redis_url}
    report: dict[str, Any] = {"machine": stores.machine(), "settings": settings}
    report["directory"] = str(home)
    with scratch(stores, home) as created:
        measure(report, stores, created)
        report["ratios"] = ratios(report)
        finish(report, show, json_path, console)


def measure(report: dict[str, Any], stores: Stores, created: list[str]) -> None:
    """The capacity without the limit, then the same closed loop with it."""
    s = report["settings"]
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    names = (f"{name}_w", f"{name}_k", f"{name}_r")
    key, wallets_key = prepare_stores(
        stores, names, created, "bench.ratelimit", PAYMENTS_WRITE, WALLETS_WRITE
    )
    env = served_env(stores.home, *(stores.url(db) for db in names))
    env["KESSAI_OVERLOAD_MAX_IN_FLIGHT"] = UNBOUNDED
    limited_env = {
        **env,
        "KESSAI_RATE_LIMIT_WRITES": f"{s['limit_per_second']}/second",
        "KESSAI_REDIS_URL": s["redis_url"],
    }
    for label, server_env in (("unlimited", env), ("limited", limited_env)):
        port = free_port()
        argv = [sys.executable, "-m", "kessai_cli", "command-api", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(s["workers"])]
        with served(argv, server_env, port, stores.home / f"{label}.log") as api:
            if "funding" not in report:  # once, on the unlimited server: both share the wallets
                payers = loadgen.payers(loadgen.Mix(users=s["users"]))
                report["funding"] = fund_payers(api.url, wallets_key, payers)
            console.print(f"{label}: {s['connections']} connections, {s['seconds']:g} s")
            loop = functools.partial(closed_loop, api.url, key, s["connections"], users=s["users"])
            if s["warmup_seconds"] > 0:
                asyncio.run(loop(s["warmup_seconds"]))
            tally = asyncio.run(loop(s["seconds"]))
            report[label] = tally.figures()


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    limited, unlimited = report["limited"], report["unlimited"]
    limit = report["settings"]["limit_per_second"]
    elapsed = limited["elapsed_seconds"]
    capacity = unlimited["ok_per_second"]
    return {
        "passed_per_second_vs_limit": round(limited["passed_per_second"] / limit, 3),
        "bound_vs_limit": round((elapsed + 1) / elapsed, 3) if elapsed else None,
        "passed_per_second_vs_capacity": round(limited["passed_per_second"] / capacity, 3)
        if capacity
        else None,
        "capacity_vs_limit": round(capacity / limit, 3),
        "vacuous": capacity <= limit,
    }


def show(report: dict[str, Any]) -> None:
    s, r = report["settings"], report["ratios"]
    about = machine_table(report["machine"])
    about.add_row(
        "run",
        f"{s['connections']} connections closed loop, {s['seconds']:g} s (+{s['warmup_seconds']:g}"
        f" s warm-up) per server, {s['workers']} uvicorn workers, counters in {s['redis_url']}",
    )
    console.print(about)
    table = Table(title=f"a per-key limit of {s['limit_per_second']}/s, and without it")
    for column in ("server", "answers by status", "2xx/s", "let through/s", "most in 1 s",
                   "429 with Retry-After, Remaining 0", "connection errors"):  # fmt: skip
        table.add_column(column, justify="left" if column == "server" else "right")
    for label in ("limited", "unlimited"):
        f = report[label]
        share = f["limited_with_retry_after_and_remaining_0"]
        table.add_row(
            label,
            ", ".join(f"{k}: {v:,}" for k, v in f["by_status"].items()),
            f"{f['ok_per_second']:,.1f}",
            f"{f['passed_per_second']:,.1f}",
            f"{f['passed_most_in_one_second']:,}",
            "-" if share is None else f"{share:.1%} of {f['limited']:,}",
            f"{f['connection_errors']:,}",
        )
    console.print(table)
    verdict = "[red]vacuous: the API cannot serve the limit[/red]" if r["vacuous"] else ""
    console.print(
        f"let through / limit: {r['passed_per_second_vs_limit']} (the window allows up to "
        f"{r['bound_vs_limit']} over this run); let through / capacity without the limit: "
        f"{r['passed_per_second_vs_capacity']}; capacity / limit: {r['capacity_vs_limit']} "
        + verdict
    )


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
