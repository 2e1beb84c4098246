"""``python -m bench.queries``: prepare the databases, load, check, measure, report, clean up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import orjson
import typer
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from bench.queries import sqlite
from bench.queries.check import Client, check, explain
from bench.queries.dataset import Shape, counts, load, merchant_ids
from bench.queries.drive import Kind, drive, kinds
from bench.queries.report import TARGETS, console, ratios, show
from bench.reconciler import (
    DEFAULT_DB_URL,
    drop_database,
)
from bench.serving import UNLIMITED, Served, served
from bench.stores import Stores, temporary_home
from kessai.auth import create_key, merchant_scope
from kessai.broker import free_port
from kessai.db import create_db_engine
from kessai.settings import Settings
from migrations import upgrade

RATE_SHARE = 0.5
"""Open loop, by default, at half the rate the kind reached closed-loop in the same run."""
OPEN_LOOP_REQUESTS = 1_000
"""Requests an open-loop run aims at (its p99 then rests on the ten slowest or more)."""


# -- the command -------------------------------------------------------------------------------


def main(
    payments: Annotated[int, typer.Option(min=100, help="Payments in the read database.")] = (
        1_000_000
    ),
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 32,
    seconds: Annotated[float, typer.Option(min=0.5, help="Measured seconds per kind.")] = 5.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first, per kind.")] = 1.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    pages: Annotated[
        int, typer.Option(min=2, help="Pages per walk of the list (first page included).")
    ] = 10,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; the bench creates its databases), or 'sqlite' (or "
            "sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    days: Annotated[int, typer.Option(min=1, max=60, help="Days the payments span.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set and of the requests.")] = 7,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Measure only these kinds (keys; repeat). Baselines always run."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for one kind (.svg, .json, or collapsed stacks)."),
    ] = None,
    profile_kind: Annotated[
        str, typer.Option(help="The kind --profile samples (its key).")
    ] = "list-next-big",
    keep: Annotated[
        bool, typer.Option(help="Keep the read database (its name is printed).")
    ] = False,
    reuse: Annotated[
        str | None,
        typer.Option(help="Measure the read database NAME_r kept by an earlier --keep."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=1, help="Open loop at this many requests/s for every kind (default: --rate-share)."
        ),
    ] = None,
    rate_share: Annotated[
        float,
        typer.Option(
            min=0.01, max=1.0, help="Without --rate: open loop at this share of the kind's req/s."
        ),
    ] = RATE_SHARE,
) -> None:
    """Benchmark the query API's summaries and list pages against a bare GET endpoint."""
    run(Options(**locals()))  # every parameter, by name


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's choices (see ``main``)."""

    payments: int
    connections: int
    seconds: float
    warmup: float
    workers: int
    pages: int
    db_url: str
    days: int
    seed: int
    only: list[str] | None
    json_path: Path | None
    profile: Path | None
    profile_kind: str
    keep: bool
    reuse: str | None
    rate: float | None
    rate_share: float


def run(o: Options) -> None:
    """Prepare, load, check, measure, report; drop what was created, whatever happens."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    name = o.reuse or f"kessai_bench_{uuid.uuid4().hex[:10]}"
    read_db, keys_db = f"{name}_r", f"{name}_k{uuid.uuid4().hex[:6]}"
    if Stores(o.db_url, Path()).sqlite and (o.keep or o.reuse is not None):
        raise typer.BadParameter("--keep and --reuse need a server: SQLite files are temporary")
    home = temporary_home(o.db_url, "kessai-bench-queries-")
    stores = Stores(o.db_url, home)
    settings = Settings()
    every_kind = kinds(o.pages)
    _refuse_unknown_kinds(every_kind, [*(o.only or []), *([o.profile_kind] if o.profile else [])])
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "connections": o.connections,
            "seconds": o.seconds,
            "warmup_seconds": o.warmup,
            "workers": o.workers,
            "pages_per_walk": o.pages,
            "open_loop_rate": o.rate,
            "open_loop_rate_share": None if o.rate is not None else o.rate_share,
            "seed": o.seed,
            "summary_cache_seconds": settings.summary_cache_seconds,
            "redis": settings.redis_url is not None and "KESSAI_REDIS_URL" in os.environ,
        },
        "targets": TARGETS,
        "databases": [read_db, keys_db],
        "directory": str(home),
    }
    created: list[str] = []
    try:
        with Progress(
            TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            if o.reuse is None:
                started = time.perf_counter()
                stores.create(read_db)
                created.append(read_db)
                shape = Shape(payments=o.payments, seed=o.seed, days=o.days)
                report["load"] = _load(shape, stores, read_db, settings, progress, started)
            report["data"] = _data(stores.url(read_db), o.days, o.seed, read_db)
            stores.create(keys_db)
            created.append(keys_db)
            merchants = report["data"]["merchants"]
            key = _create_key(stores.url(keys_db), merchants)
            measuring = Measuring(o, key, merchants, settings, stores.server_pid(), progress)
            measured = [k for k in every_kind if k.group == "bare" or not o.only or k.key in o.only]
            runs, open_runs = _serve_and_measure(
                report, measuring, stores, home, read_db, keys_db, measured
            )
        report["runs"] = ratios(runs)
        report["open_loop"] = open_runs
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if o.json_path is not None:
            o.json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {o.json_path}")
    finally:
        _clean_up(o, stores, created, name, read_db, home)


def _clean_up(
    o: Options, stores: Stores, created: list[str], name: str, read_db: str, home: Path
) -> None:
    """Drop the databases this run created (but a kept read database) and its directory."""
    for db in created:
        if o.keep and db == read_db:
            continue
        with contextlib.suppress(Exception):
            stores.drop(db)
    if o.reuse is not None and not o.keep:
        with contextlib.suppress(Exception):
            drop_database(o.db_url, read_db)
    if o.keep:
        console.print(f"kept: --reuse {name}  ({read_db})")
    shutil.rmtree(home, ignore_errors=True)


def _refuse_unknown_kinds(every_kind: list[Kind], asked: list[str]) -> None:
    known = {k.key for k in every_kind}
    for key in asked:
        if key not in known:
            raise typer.BadParameter(f"unknown kind {key!r}: one of {', '.join(sorted(known))}")


def _load(
    shape: Shape,
    stores: Stores,
    read_db: str,
    settings: Settings,
    progress: Progress,
    started: float,
) -> dict[str, Any]:
    """Migrate the new read database and load the data set into it (``seconds``: since
    ``started``, its creation included)."""
    upgrade("read", stores.url(read_db))
    if stores.sqlite:  # the same rows, computed here: see bench/queries/sqlite.py
        loaded = sqlite.load(shape, stores, read_db, settings, progress)
    else:
        loaded = load(shape, stores.db_url, read_db, settings, progress)
    loaded["seconds"] = round(time.perf_counter() - started, 2)
    console.print(
        f"loaded {shape.payments:,} payments in {loaded['seconds']:.1f} s "
        f"(rows {loaded['rows_seconds']:.1f} s, indexes "
        f"{loaded['indexes_seconds']:.1f} s, totals "
        f"{loaded['totals_seconds']:.1f} s)"
    )
    return loaded


def _data(read_url: str, days: int, seed: int, read_db: str) -> dict[str, Any]:
    """What the read database holds; warns when its newest payment is hours old."""
    data = sqlite.counts(read_url) if read_url.startswith("sqlite") else counts(read_url)
    data.update({"days": days, "seed": seed, "database": read_db})
    if data["last_payment_at"] is not None:
        behind = datetime.now(UTC) - datetime.fromisoformat(data["last_payment_at"])
        if behind > timedelta(hours=6):
            console.print(
                f"[yellow]the data ends {behind} ago: today's summaries and the "
                "newest pages hold less than when it was loaded[/yellow]"
            )
    return data


def _create_key(keys_url: str, merchants: int) -> str:
    """Migrate the key store and create one API key reading every merchant."""
    upgrade("keys", keys_url)
    engine = create_db_engine(keys_url, pool_size=1)
    try:
        return create_key(
            engine,
            [merchant_scope(m) for m in merchant_ids(merchants)],
            "bench.queries",
        )[1]
    finally:
        engine.dispose()


def _served_env(home: Path, read_url: str, keys_url: str) -> dict[str, str]:
    """The served processes' environment: no KESSAI_ setting of this shell but the cache's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
    for setting in ("REDIS_URL", "SUMMARY_CACHE_SECONDS"):
        if f"KESSAI_{setting}" in os.environ:
            env[f"KESSAI_{setting}"] = os.environ[f"KESSAI_{setting}"]
    env.update(
        {
            "KESSAI_HOME": str(home),
            "KESSAI_READ_DB_URL": read_url,
            "KESSAI_KEYS_DB_URL": keys_url,
            "KESSAI_WRITE_DB_URL": f"sqlite:///{home / 'write.db'}",
            "KESSAI_RATE_LIMIT_PER_IP": UNLIMITED,
            "KESSAI_RATE_LIMIT_READS": UNLIMITED,
            "KESSAI_RATE_LIMIT_EXPENSIVE": UNLIMITED,
            "KESSAI_LOG_LEVEL": "WARNING",
        }
    )
    return env


@dataclass(frozen=True, slots=True)
class Measuring:
    """How every kind is driven in this run: ``drive``'s arguments but the server and kind."""

    options: Options
    key: str
    merchants: int
    settings: Settings
    mysqld: int | None
    progress: Progress

    def measure(self, server: Served, kind: Kind, at: float | None = None) -> dict[str, Any]:
        """One closed-loop run of ``kind``, or an open-loop one at ``at`` requests/s."""
        o = self.options
        return drive(
            server,
            self.key,
            kind,
            merchants=self.merchants,
            settings=self.settings,
            connections=o.connections,
            seconds=o.seconds if at is None else open_seconds(o.seconds, at),
            warmup=o.warmup,
            seed=o.seed,
            mysqld=self.mysqld,
            db_url=o.db_url,
            progress=self.progress,
            profile=o.profile if kind.key == o.profile_kind and at is None else None,
            rate=at,
        )


def _serve_and_measure(
    report: dict[str, Any],
    measuring: Measuring,
    stores: Stores,
    home: Path,
    read_db: str,
    keys_db: str,
    measured_kinds: list[Kind],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Serve the query API and the bare app, check the answers, then drive every kind;
    returns the closed-loop and the open-loop runs."""
    read_url, keys_url = stores.url(read_db), stores.url(keys_db)
    env = _served_env(home, read_url, keys_url)
    report["settings"]["redis"] = "KESSAI_REDIS_URL" in env
    merchants, settings = measuring.merchants, measuring.settings
    report["explain"] = explain(read_url, settings, merchants)
    query_port, bare_port = free_port(), free_port()
    api_argv = [sys.executable, "-m", "kessai_cli", "query-api", "--host", "127.0.0.1"]
    workers = measuring.options.workers
    api_argv += ["--port", str(query_port), "--workers", str(workers)]
    bare_argv = [sys.executable, "-m", "uvicorn", "bench.bare_app:create_app"]
    bare_argv += ["--factory", "--host", "127.0.0.1", "--port", str(bare_port)]
    bare_argv += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    with (
        served(api_argv, env, query_port, home / "query-api.log") as api,
        served(bare_argv, env, bare_port, home / "bare.log") as bare,
    ):
        task = measuring.progress.add_task("checking the answers against the rows", total=None)
        report["check"] = check(Client(api.url, measuring.key), read_url, settings, merchants)
        measuring.progress.remove_task(task)
        runs = _measure_kinds(measuring, api, bare, measured_kinds)
        report["memory"] = {"query_api": api.memory(), "bare": bare.memory()}
    return runs


def _measure_kinds(
    measuring: Measuring,
    api: Served,
    bare: Served,
    measured_kinds: list[Kind],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The baselines, then each kind closed-loop and open-loop (beside the bare endpoint at
    the same rate), then the baselines again; returns the closed and the open runs."""
    runs: list[dict[str, Any]] = []
    open_runs: list[dict[str, Any]] = []
    bare_at: dict[tuple[str, float], dict[str, Any]] = {}
    baselines = {k.key: k for k in measured_kinds if k.group == "bare"}
    for kind in baselines.values():
        runs.append(measuring.measure(bare, kind))
    for kind in measured_kinds:
        if kind.group != "bare":
            saturated = measuring.measure(api, kind)
            runs.append(saturated)
            o = measuring.options
            at = o.rate or stated_rate(saturated["per_second"], o.rate_share)
            mine = measuring.measure(api, kind, at)
            if (kind.baseline, at) not in bare_at:
                bare_at[kind.baseline, at] = measuring.measure(bare, baselines[kind.baseline], at)
            open_runs.append(open_loop(mine, bare_at[kind.baseline, at]))
    for kind in baselines.values():
        runs.append(measuring.measure(bare, kind))
    return runs, open_runs


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stated_rate(saturated_per_second: float, share: float) -> float:
    """The open loop's rate for a kind: ``share`` of the rate it reached closed-loop, rounded
    to two significant digits (a rate worth stating), at least 1 request/s."""
    raw = max(1.0, saturated_per_second * share)
    digits = len(str(int(raw))) - 2
    return float(max(1, round(raw, -digits if digits > 0 else 0)))


def open_seconds(seconds: float, rate: float) -> float:
    """How long an open loop runs: ``seconds``, longer (up to three times) when that would
    give fewer than ``OPEN_LOOP_REQUESTS`` requests, so that the p99 rests on ten or more."""
    return round(min(3 * seconds, max(seconds, OPEN_LOOP_REQUESTS / rate)), 2)


def open_loop(mine: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """A kind's open-loop run beside the bare endpoint's at the same rate."""
    rate = mine["rate"]
    bare_p99 = bare["latency_ms"]["p99"]
    return {
        "key": mine["key"],
        "name": mine["name"],
        "group": mine["group"],
        "rate": rate,
        # Every request due was sent; a server that fell behind shows as a lower rate
        # answered (the run lasted longer than its schedule).
        "sustained": mine["per_second"] >= 0.95 * rate and bare["per_second"] >= 0.95 * rate,
        "p99_vs_bare": round(mine["latency_ms"]["p99"] / bare_p99, 2) if bare_p99 else None,
        "api": mine,
        "bare": bare,
    }


def cli() -> None:
    typer.run(main)
