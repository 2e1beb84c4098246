"""The command API served by uvicorn against granian, 1 and 2 workers, interleaved in one run.

``python -m bench.servers [--connections 64] [--seconds 8] [--rounds 2] [--workers 1
--workers 2] [--users 10000] [--db-url mysql+pymysql://root@127.0.0.1:3306] [--json out.json]``

granian is not a dependency of kessai: ``.venv/bin/pip install granian`` first.

Creates fresh databases and keys as ``bench/writes.py`` does, funds the load generator's
payers' wallets through the first kessai server it serves, before its first measured run (the
payments are balance payments; ``bench.drive.fund_payers``), then for each round and
worker count serves the real command API (``command_service.app:create_served_app``, what ``kessai
command-api`` serves) and the bare endpoint (``bench/bare_app.py``) with each server in turn,
uvicorn and granian alternating which goes first, and drives each with the traffic of
``kessai loadgen`` (``bench.drive.drive``): every kessai run on the same databases, which
grow as the runs go. uvicorn is run as ``kessai command-api`` runs it (uvloop, httptools);
granian with ``--interface asgi --loop uvloop --http 1``. Prints every run, then the medians
per server and worker count with their ratios to uvicorn at the same worker count: answers/s,
accepted/s, p50/p99, CPU of the server processes per answer, peak RSS of the largest process
and RSS of all of them together.
"""

from __future__ import annotations

import functools
import importlib.util
import signal
import statistics
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.drive import drive, fund_payers
from bench.reconciler import DEFAULT_DB_URL, machine_table
from bench.serving import interrupt, served, served_env
from bench.stores import Stores, finish, prepare_stores, scratch, temporary_home
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.broker import free_port
from kessai_cli import loadgen

console = Console(width=None if sys.stdout.isatty() else 120)

SERVERS = ("uvicorn", "granian")
APPS = {"kessai": "command_service.app:create_served_app", "bare": "bench.bare_app:create_app"}


def server_argv(server: str, app: str, port: int, workers: int) -> list[str]:
    """How ``server`` serves ``app`` (a key of ``APPS``) on 127.0.0.1:``port``."""
    if server == "uvicorn" and app == "kessai":
        argv = [sys.executable, "-m", "kessai_cli", "command-api", "--host", "127.0.0.1"]
        return [*argv, "--port", str(port), "--workers", str(workers)]
    if server == "uvicorn":
        argv = [sys.executable, "-m", "uvicorn", APPS[app], "--factory", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(workers)]
        return [*argv, "--log-level", "warning", "--no-access-log"]
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    argv += ["--loop", "uvloop", "--http", "1", "--no-ws", "--log-level", "warning"]
    return [*argv, "--no-access-log", APPS[app]]


def granian_missing() -> bool:
    return importlib.util.find_spec("granian") is None


def server_names(servers: list[str] | None) -> list[str]:
    """The servers of ``--server`` (default: all of ``SERVERS``); a bad parameter if one is
    unknown, exit 2 if granian is asked for and not installed."""
    names = servers or list(SERVERS)
    unknown = [s for s in names if s not in SERVERS]
    if unknown:
        raise typer.BadParameter(f"unknown server {unknown[0]!r}: uvicorn or granian")
    if "granian" in names and granian_missing():
        console.print(
            "granian is not installed (it is not a dependency of kessai): "
            ".venv/bin/pip install granian, or --server uvicorn"
        )
        raise typer.Exit(2)
    return names


def funding_once(wallets_key: str, users: int, funding: dict[str, Any]) -> Callable[[str], None]:
    """The ``fund`` of ``every_run``: the first URL it is given funds the load generator's
    ``users`` payers (``bench.drive.fund_payers``, its figures into ``funding``); the others
    do nothing, the wallets being in the databases every kessai run shares."""

    def fund(url: str) -> None:
        if not funding:
            funding.update(fund_payers(url, wallets_key, loadgen.payers(loadgen.Mix(users=users))))

    return fund


def main(
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 64,
    seconds: Annotated[float, typer.Option(min=1, help="Measured seconds per run.")] = 8.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first.")] = 2.0,
    rounds: Annotated[int, typer.Option(min=1, help="Runs of each combination.")] = 2,
    workers: Annotated[
        list[int] | None, typer.Option(help="Worker counts (repeat the option).")
    ] = None,
    servers: Annotated[
        list[str] | None, typer.Option("--server", help="uvicorn, granian (repeat the option).")
    ] = None,
    db_url: Annotated[
        str, typer.Option(help="Server URL (no database; the bench creates its databases).")
    ] = DEFAULT_DB_URL,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    users: Annotated[
        int, typer.Option(min=1, help="Payers of the traffic, their wallets funded first.")
    ] = loadgen.USERS,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
) -> None:
    """Serve the command API and the bare endpoint with uvicorn and granian, interleaved."""
    counts = workers or [1, 2]
    names = server_names(servers)
    signal.signal(signal.SIGTERM, interrupt)
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    write_db, keys_db, read_db = f"{name}_w", f"{name}_k", f"{name}_r"
    home = temporary_home(db_url, "kessai-bench-servers-")
    stores = Stores(db_url, home)
    write_url, keys_url, read_url = (stores.url(db) for db in (write_db, keys_db, read_db))
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "connections": connections,
            "seconds": seconds,
            "warmup_seconds": warmup,
            "rounds": rounds,
            "workers": counts,
            "servers": names,
            "seed": seed,
            "users": users,
        },
    }
    with scratch(stores, home) as created:
        key, wallets_key = prepare_stores(
            stores,
            (write_db, keys_db, read_db),
            created,
            "bench.servers",
            PAYMENTS_WRITE,
            WALLETS_WRITE,
        )
        env = served_env(home, write_url, keys_url, read_url)
        with Progress(
            TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            measure = functools.partial(
                drive,
                key=key,
                connections=connections,
                seconds=seconds,
                warmup=warmup,
                seed=seed,
                users=users,
                mysqld=stores.server_pid(),
                progress=progress,
            )
            funding: dict[str, Any] = {}
            fund = funding_once(wallets_key, users, funding)
            report["runs"] = every_run(measure, env, home, rounds, counts, names, fund)
        report["funding"] = funding
        report["medians"] = medians(report["runs"])
        finish(report, show, json_path, console)


def every_run(
    measure: Callable[..., dict[str, Any]],
    env: dict[str, str],
    home: Path,
    rounds: int,
    counts: list[int],
    names: list[str],
    fund: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each round, worker count, app and server in turn, the servers alternating which goes
    first from one round to the next: the figures of every run, in order. ``fund`` is given
    the URL of every kessai server before it is measured (it funds the payers the first time)."""
    runs = []
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for count in counts:
            for app in APPS:
                for server in order:
                    port = free_port()
                    argv = server_argv(server, app, port, count)
                    log = home / f"{server}-{app}.log"
                    with served(argv, env, port, log) as api:
                        if app == "kessai":
                            fund(api.url)
                        figures = measure(api, label=f"{app} {server} {count}w")
                    run = {"server": server, "app": app, "workers": count}
                    runs.append({**run, "round": round_, **figures})
    return runs


def cpu_ms_per_answer(run: dict[str, Any]) -> float:
    answered = sum(run["by_status"].values())
    return run["server_cpu_seconds"] * 1000 / answered if answered else 0.0


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per app, worker count and server: the median of its runs, and ratios to uvicorn's."""
    rows: list[dict[str, Any]] = []
    for app in APPS:
        for count in sorted({r["workers"] for r in runs}):
            for server in SERVERS:
                mine = [
                    r for r in runs if (r["app"], r["workers"], r["server"]) == (app, count, server)
                ]
                if not mine:
                    continue
                rows.append(
                    {
                        "app": app,
                        "workers": count,
                        "server": server,
                        "runs": len(mine),
                        "ok_per_second": statistics.median(r["ok_per_second"] for r in mine),
                        "accepted_per_second": statistics.median(
                            r["accepted_per_second"] for r in mine
                        ),
                        "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in mine),
                        "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in mine),
                        "cpu_ms_per_answer": round(
                            statistics.median(cpu_ms_per_answer(r) for r in mine), 3
                        ),
                        "peak_rss_mib_max": statistics.median(
                            r["memory"]["peak_rss_mib_max"] for r in mine
                        ),
                        "rss_mib_total": statistics.median(
                            r["memory"]["rss_mib_total"] for r in mine
                        ),
                        "non_2xx": sum(
                            v
                            for r in mine
                            for k, v in r["by_status"].items()
                            if not 200 <= int(k) < 300
                        )
                        + sum(r["connection_errors"] for r in mine),
                    }
                )
    figures = ["ok_per_second", "accepted_per_second", "p50_ms", "p99_ms", "cpu_ms_per_answer"]
    figures += ["peak_rss_mib_max", "rss_mib_total"]
    for row in rows:
        base = next(
            (
                b
                for b in rows
                if (b["app"], b["workers"], b["server"]) == (row["app"], row["workers"], "uvicorn")
            ),
            None,
        )
        row["vs_uvicorn"] = (
            None
            if base is None
            else {f: round(row[f] / base[f], 2) if base[f] else None for f in figures}
        )
    return rows


def show(report: dict[str, Any]) -> None:
    s = report["settings"]
    about = machine_table(report["machine"])
    about.add_row(
        "run",
        f"{s['connections']} connections, {s['seconds']:g} s (+{s['warmup_seconds']:g} s "
        f"warm-up) per run, {s['rounds']} rounds, servers alternating",
    )
    console.print(about)
    runs = Table(title="every run, in order (latencies in ms)")
    for column in ("app", "server", "workers", "ok/s", "accepted/s", "p50", "p99", "CPU ms/ans"):
        runs.add_column(column, justify="left" if column in ("app", "server") else "right")
    for r in report["runs"]:
        runs.add_row(
            r["app"],
            r["server"],
            str(r["workers"]),
            f"{r['ok_per_second']:,.0f}",
            f"{r['accepted_per_second']:,.0f}",
            f"{r['latency_ms']['p50']:.1f}",
            f"{r['latency_ms']['p99']:.1f}",
            f"{cpu_ms_per_answer(r):.3f}",
        )
    console.print(runs)
    table = Table(title="medians per server; in brackets, the ratio to uvicorn's")
    for column in (
        "app", "workers", "server", "ok/s", "accepted/s", "p50 ms", "p99 ms",
        "CPU ms/answer", "peak RSS MiB", "RSS all MiB", "non-2xx",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in ("app", "server") else "right")
    for row in report["medians"]:
        ratio = row["vs_uvicorn"] or {}

        def cell(field: str, fmt: str, row: dict[str, Any] = row, ratio: Any = ratio) -> str:
            text = format(row[field], fmt)
            return text if row["server"] == "uvicorn" else f"{text} ({ratio.get(field)})"

        table.add_row(
            row["app"],
            str(row["workers"]),
            row["server"],
            cell("ok_per_second", ",.0f"),
            cell("accepted_per_second", ",.0f"),
            cell("p50_ms", ".1f"),
            cell("p99_ms", ".1f"),
            cell("cpu_ms_per_answer", ".3f"),
            cell("peak_rss_mib_max", ".0f"),
            cell("rss_mib_total", ".0f"),
            str(row["non_2xx"]),
        )
    console.print(table)


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
