"""The load: which requests each kind sends, and the closed- and open-loop runs that send them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from rich.progress import Progress

from bench.profiling import py_spy
from bench.queries.dataset import OTHER_ZONE, PAGE_SIZE, in_other_zone, merchant_id
from bench.reconciler import (
    connect,
    process_cpu,
)
from bench.serving import Served
from kessai.settings import Settings
from kessai_cli import loadgen

SMALL_BODY_ITEMS = 3
"""Items of the bare baseline's summary-sized body (about 1.2 KB)."""


# -- the load ----------------------------------------------------------------------------------


class Picker(Protocol):
    def next(self) -> tuple[str, str]:
        """(tag, path with query) of the next request."""

    def answered(self, tag: str, status: int, body: bytes) -> None: ...


def _today(zone: ZoneInfo) -> date:
    return datetime.now(zone).date()


class Merchants:
    """Which merchant a request is for: the big one, or a tail merchant drawn uniformly."""

    def __init__(self, which: str, merchants: int, rng: random.Random, settings: Settings) -> None:
        self.which, self.count, self.rng = which, merchants, rng
        self.default = ZoneInfo(settings.default_merchant_time_zone)
        self.other = ZoneInfo(OTHER_ZONE)

    def pick(self) -> tuple[str, ZoneInfo]:
        rank = 0 if self.which == "big" else self.rng.randrange(1, self.count)
        return merchant_id(rank), self.other if in_other_zone(rank) else self.default


class SummaryPicker:
    def __init__(self, merchants: Merchants, query: Callable[[date], dict[str, str]]) -> None:
        self.merchants, self.query = merchants, query

    def next(self) -> tuple[str, str]:
        merchant, zone = self.merchants.pick()
        params = self.query(_today(zone))
        return "summary", f"/v1/merchants/{merchant}/summary" + (
            f"?{urlencode(params)}" if params else ""
        )

    def answered(self, tag: str, status: int, body: bytes) -> None:
        pass


class ListWalker:
    """First pages (``pages`` = 1), or walks of up to ``pages`` pages following
    ``next_cursor``, then another merchant."""

    MARK = b'"next_cursor":"'

    def __init__(self, merchants: Merchants, pages: int) -> None:
        self.merchants, self.pages = merchants, pages
        self.path = ""
        self.cursor: str | None = None
        self.depth = 0

    def next(self) -> tuple[str, str]:
        if self.cursor is None:
            merchant, _ = self.merchants.pick()
            self.path = f"/v1/merchants/{merchant}/payments"
            self.depth = 1
            return "first page", self.path
        self.depth += 1
        return "next page", f"{self.path}?cursor={self.cursor}"

    def answered(self, tag: str, status: int, body: bytes) -> None:
        self.cursor = None
        if status != 200 or self.depth >= self.pages:
            return
        at = body.find(self.MARK)
        if at >= 0:
            start = at + len(self.MARK)
            self.cursor = body[start : body.index(b'"', start)].decode()


class BarePicker:
    def __init__(self, items: int, merchants: Merchants) -> None:
        self.items, self.merchants = items, merchants

    def next(self) -> tuple[str, str]:
        merchant, _ = self.merchants.pick()
        return "bare", f"/v1/bare/merchants/{merchant}?items={self.items}"

    def answered(self, tag: str, status: int, body: bytes) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Kind:
    key: str
    name: str
    group: str
    """bare, summary or list: which target applies, and which bare body it is compared with."""
    merchants: str
    """big or tail."""
    picker: Callable[[Merchants], Picker]
    baseline: str
    """The key of the bare kind it is compared with."""


def _days_back(days: int, **extra: str) -> Callable[[date], dict[str, str]]:
    def query(today: date) -> dict[str, str]:
        start = today - timedelta(days=days - 1)
        return {"from": start.isoformat(), "to": today.isoformat(), **extra}

    return query


def kinds(pages: int) -> list[Kind]:
    bare_small = Kind(
        "bare-small", f"bare GET, {SMALL_BODY_ITEMS} items", "bare", "tail",
        lambda m: BarePicker(SMALL_BODY_ITEMS, m), "bare-small",
    )  # fmt: skip
    bare_page = Kind(
        "bare-page", f"bare GET, {PAGE_SIZE} items", "bare", "tail",
        lambda m: BarePicker(PAGE_SIZE, m), "bare-page",
    )  # fmt: skip
    summaries: list[tuple[str, str, Callable[[date], dict[str, str]]]] = [
        ("today", "summary today (cache)", lambda _today: {}),
        ("today-uncached", "summary today (from=to)", _days_back(1)),
        ("7d", "summary 7 d by day", _days_back(7)),
        ("30d", "summary 30 d by day", _days_back(30)),
        ("7d-hour", "summary 7 d by hour", _days_back(7, granularity="hour")),
    ]
    out = [bare_small, bare_page]
    for key, name, query in summaries:
        for which in ("big", "tail"):
            out.append(
                Kind(
                    f"summary-{key}-{which}",
                    f"{name}, {which}",
                    "summary",
                    which,
                    lambda m, q=query: SummaryPicker(m, q),  # type: ignore[misc]
                    "bare-small",
                )
            )
    for key, name, depth in (
        ("first", "list first page", 1),
        ("next", f"list walk of {pages} pages", pages),
    ):
        for which in ("big", "tail"):
            out.append(
                Kind(
                    f"list-{key}-{which}",
                    f"{name}, {which}",
                    "list",
                    which,
                    lambda m, d=depth: ListWalker(m, d),  # type: ignore[misc]
                    "bare-page",
                )
            )
    return out


@dataclass(slots=True)
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    body_bytes: int = 0
    elapsed: float = 0.0
    client_cpu_seconds: float = 0.0


async def send(
    url: str,
    key: str,
    pickers: list[Picker],
    seconds: float,
    rate: float | None = None,
    on_progress: Callable[[Tally, float], None] | None = None,
) -> Tally:
    """Each picker drives one keep-alive connection (``kessai_cli.loadgen.drive``): closed loop
    (``rate`` None: a request when the previous one is answered) or open loop at ``rate``
    requests/s, latency counted from when each request was due."""
    host, port = url.removeprefix("http://").split(":")
    common = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\nUser-Agent: kessai-bench\r\n"
    tally = Tally()
    start, cpu = time.perf_counter(), time.process_time()

    def source(picker: Picker) -> Callable[[], loadgen.Request]:
        def request() -> loadgen.Request:
            tag, path = picker.next()

            def answered(answer: loadgen.Answer, seconds: float) -> None:
                tally.latencies.setdefault(tag, []).append(seconds)
                tally.statuses[answer.status] += 1
                tally.body_bytes += len(answer.body)
                picker.answered(tag, answer.status, answer.body)

            return loadgen.Request(f"GET {path} HTTP/1.1\r\n{common}\r\n".encode(), b"", answered)

        return request

    def failed() -> None:
        tally.connection_errors += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                on_progress(tally, time.perf_counter() - start)

    reporter = asyncio.create_task(report())
    try:
        schedule = loadgen.Schedule(rate, seconds)
        await loadgen.drive(url, schedule, [source(p) for p in pickers], failed)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    tally.elapsed = time.perf_counter() - start
    tally.client_cpu_seconds = time.process_time() - cpu
    return tally


def _ms(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 2)


def latency(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50": _ms(ordered, 0.50),
        "p90": _ms(ordered, 0.90),
        "p99": _ms(ordered, 0.99),
        "max": _ms(ordered, 1.0),
    }


def sampling(path: Path | None, pid: int) -> contextlib.AbstractContextManager[None]:
    """py-spy attached to ``pid`` and its subprocesses (uvicorn's workers) while the block
    runs."""
    return py_spy(pid, path, "--subprocesses", attach_seconds=1.5)


def connections_opened(server_url: str) -> int | None:
    """The database server's count of connections opened so far (every client's); None on
    SQLite (no server)."""
    if server_url.startswith("sqlite"):
        return None
    with contextlib.suppress(Exception), connect(server_url) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        row = cur.fetchone()
        return int(row[1]) if row else None
    return None


def drive(
    server: Served,
    key: str,
    kind: Kind,
    *,
    merchants: int,
    settings: Settings,
    connections: int,
    seconds: float,
    warmup: float,
    seed: int,
    mysqld: int | None,
    db_url: str,
    progress: Progress,
    profile: Path | None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Warm up, then drive ``kind`` against ``server``, closed loop or (``rate``) open loop at
    that many requests/s; the figures of the run."""

    def pickers(salt: int) -> list[Picker]:
        return [
            kind.picker(Merchants(kind.merchants, merchants, random.Random(salt + i), settings))
            for i in range(connections)
        ]

    label = kind.name if rate is None else f"{kind.name} at {rate:,.0f}/s"
    task = progress.add_task(f"{label}: warming up", total=None)

    def on_progress(tally: Tally, elapsed: float) -> None:
        answered = sum(len(v) for v in tally.latencies.values())
        progress.update(
            task,
            description=f"{label}: {elapsed:4.1f}/{seconds:g} s, "
            f"{answered / elapsed if elapsed else 0:,.0f}/s",
        )

    try:
        if warmup > 0:
            asyncio.run(send(server.url, key, pickers(seed * 1_000_003), warmup, rate))
        opened = connections_opened(db_url)
        api_cpu, db_cpu = server.cpu(), process_cpu(mysqld)
        with sampling(profile, server.process.pid):
            tally = asyncio.run(send(server.url, key, pickers(seed), seconds, rate, on_progress))
        api_cpu = server.cpu() - api_cpu
        db_after = process_cpu(mysqld)
        opened_after = connections_opened(db_url)
    finally:
        progress.remove_task(task)
    answered = sum(len(v) for v in tally.latencies.values())
    ok = sum(v for k, v in tally.statuses.items() if 200 <= k < 300)
    every = [x for v in tally.latencies.values() for x in v]
    return {
        "key": kind.key,
        "name": kind.name,
        "group": kind.group,
        "baseline": kind.baseline,
        "mode": "closed" if rate is None else "open",
        "rate": rate,
        "seconds": seconds,
        "answered": answered,
        "elapsed_seconds": round(tally.elapsed, 3),
        "per_second": round(answered / tally.elapsed, 1) if tally.elapsed else 0.0,
        "ok_per_second": round(ok / tally.elapsed, 1) if tally.elapsed else 0.0,
        "by_status": {str(k): v for k, v in sorted(tally.statuses.items())},
        "connection_errors": tally.connection_errors,
        "mean_body_bytes": round(tally.body_bytes / answered) if answered else 0,
        "latency_ms": latency(every),
        "latency_ms_by_tag": {tag: latency(v) for tag, v in sorted(tally.latencies.items())},
        "client_cpu_seconds": round(tally.client_cpu_seconds, 2),
        "api_cpu_seconds": round(api_cpu, 2),
        "db_cpu_seconds": None
        if db_cpu is None or db_after is None
        else round(db_after - db_cpu, 2),
        # Minus the one that reads the count; other clients of the server count too.
        "db_connections_opened": None
        if opened is None or opened_after is None
        else opened_after - opened - 1,
    }
