"""How many payments the command API takes, against what the same server and database do bare.

``python -m bench.writes [--connections 64] [--seconds 10] [--workers 2] [--users 10000]
[--db-url mysql+pymysql://root@127.0.0.1:3306 | --db-url sqlite] [--api-only]
[--json out.json] [--profile out.txt]``

1. Creates fresh databases (write store, read database and key store, ``kessai_bench_<hex>_w``
   / ``_r`` / ``_k`` on the server, or SQLite files with ``--db-url sqlite``: the embedded
   default), migrates them, creates a ``payments:write`` key and a ``wallets:write`` key.
2. Unless ``--api-only``: starts a private embedded broker, the relay, the projector and the
   query API over those databases (``bench/lag.py``).
3. Serves the real command API (``kessai command-api --workers N``, uvicorn, group commit as
   configured, rate limits out of the way) in a subprocess. First, outside anything measured,
   tops up the wallets of the load generator's payers and of the probes' (one top-up each,
   ``bench.drive.fund_payers``; with the pipeline, until the read side holds every wallet):
   the payments are balance payments, each debiting its payer's wallet. Then drives it with
   the load generator (``kessai_cli/loadgen.py``): ``--connections`` keep-alive connections for
   ``--seconds`` after ``--warmup`` seconds, campaign traffic (Zipf merchants, one with 30% of
   the payments, 3% refunds, 1% client retries with the same Idempotency-Key and body, device
   ids; no top-ups, so the traffic is the one measured before wallets existed, and the bare
   endpoint's). Figures: answers/s, accepted/s (payments and refunds recorded), latency
   p50/p90/p99, CPU of this process (the client), of the API processes and of the database
   server, and the peak RSS of every API process (``VmHWM``). With the pipeline: the
   end-to-end lag of probe payments until the query API shows them (p50/p99), applied/s on
   the read side, the time the read side needs to catch up after the load, the peak RSS of
   every service.
4. Baselines in the same run, on the same machine: a bare FastAPI app with the same body
   models and no database (``bench/bare_app.py``), served and driven identically; and raw
   single-row ``INSERT`` + ``COMMIT`` from ``--connections`` threads into a table of the same
   database for ``--seconds`` (``bench/raw_inserts.py``).
5. Prints the figures, their ratios to the baselines and the targets, and the machine; writes
   them as JSON with ``--json``; drops the databases, also on failure and Ctrl-C.

Client and servers share the machine's cores: the client's CPU is reported so a saturated
client shows (see the client's note in ``kessai_cli/loadgen.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.drive import EndToEnd, drive, fund_payers
from bench.lag import PROBE_MERCHANT, PROBE_PAYERS, AppliedCounter, Pipeline
from bench.raw_inserts import raw_inserts
from bench.reconciler import DEFAULT_DB_URL, machine_table
from bench.serving import interrupt, served, served_env
from bench.stores import Stores, finish, prepare_stores, scalar_of, scratch, temporary_home
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE, merchant_scope
from kessai.broker import free_port
from kessai_cli import loadgen

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "kessai_vs_bare": 0.70,
    "p99_ms": 50.0,
    "rss_mib": 200.0,
    "lag_p99_ms": 1000.0,
}
"""create-payment >= 70% of the bare POST rate; p99 < 50 ms at 64 connections; RSS < 200 MB;
end-to-end lag p99 < 1 s."""

console = Console(width=None if sys.stdout.isatty() else 120)


def main(
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 64,
    seconds: Annotated[float, typer.Option(min=1, help="Measured seconds per run.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first.")] = 2.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; the bench creates its databases), or 'sqlite' for "
            "the embedded default (SQLite files)."
        ),
    ] = DEFAULT_DB_URL,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    users: Annotated[
        int, typer.Option(min=1, help="Payers of the traffic, their wallets funded first.")
    ] = loadgen.USERS,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy profile of the kessai API's measured run (.svg, .json, raw)."),
    ] = None,
    end_to_end: Annotated[
        bool,
        typer.Option(
            "--end-to-end/--api-only",
            help="Run relay, broker, projector and query API too, and measure applied/s and "
            "the lag until payments show on the query API; or the command API alone.",
        ),
    ] = True,
) -> None:
    """Benchmark POST /v1/payments against a bare FastAPI endpoint and raw inserts."""
    signal.signal(signal.SIGTERM, interrupt)
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    names = (f"{name}_w", f"{name}_k", f"{name}_r")
    home = temporary_home(db_url, "kessai-bench-writes-")
    stores = Stores(db_url, home)
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "connections": connections,
            "seconds": seconds,
            "warmup_seconds": warmup,
            "workers": workers,
            "seed": seed,
            "mix": dataclasses.asdict(loadgen.Mix(seed=seed, users=users)),
            "end_to_end": end_to_end,
        },
        "targets": TARGETS,
        "directory": str(home),
    }
    with scratch(stores, home) as created:
        _measure(
            report, stores, names, created, home,
            connections=connections, seconds=seconds, warmup=warmup, seed=seed, users=users,
            workers=workers, end_to_end=end_to_end, profile=profile,
        )  # fmt: skip
        report["ratios"] = _ratios(report)
        finish(report, show, json_path, console)


def _measure(
    report: dict[str, Any],
    stores: Stores,
    names: tuple[str, str, str],
    created: list[str],
    home: Path,
    *,
    connections: int,
    seconds: float,
    warmup: float,
    seed: int,
    users: int,
    workers: int,
    end_to_end: bool,
    profile: Path | None,
) -> None:
    """Prepare the databases (each joins ``created``), then measure kessai, the bare app and
    the raw inserts into ``report``."""
    write_db, _, read_db = names
    write_url, keys_url, read_url = (stores.url(db) for db in names)
    mysqld = stores.server_pid()
    key, wallets_key, read_key = prepare_stores(
        stores,
        names,
        created,
        "bench.writes",
        PAYMENTS_WRITE,
        WALLETS_WRITE,
        merchant_scope(PROBE_MERCHANT),
    )
    env = served_env(home, write_url, keys_url, read_url)
    report["settings"]["group_commit"] = env.get("KESSAI_GROUP_COMMIT", "true (default)")
    with Progress(
        TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        measure = functools.partial(
            drive,
            connections=connections,
            seconds=seconds,
            warmup=warmup,
            seed=seed,
            users=users,
            mysqld=mysqld,
            progress=progress,
        )
        report["kessai"] = _measure_kessai(
            measure, progress, stores, home, env, (key, wallets_key, read_key),
            (write_db, read_db), users=users, workers=workers, end_to_end=end_to_end,
            profile=profile,
        )  # fmt: skip
        report["bare_fastapi"] = _measure_bare(measure, home, env, key, workers)
        task = progress.add_task(f"raw inserts: {seconds:g} s", total=None)
        report["raw_inserts"] = raw_inserts(
            stores, write_db, connections=connections, seconds=seconds, mysqld=mysqld
        )
        progress.remove_task(task)


def _measure_kessai(
    measure: functools.partial[dict[str, Any]],
    progress: Progress,
    stores: Stores,
    home: Path,
    env: dict[str, str],
    keys: tuple[str, str, str],
    databases: tuple[str, str],
    *,
    users: int,
    workers: int,
    end_to_end: bool,
    profile: Path | None,
) -> dict[str, Any]:
    """The real command API served, the payers' wallets funded, then driven; with
    ``end_to_end``, the read side behind it. ``keys``: payments, wallets, probe reads."""
    key, wallets_key, read_key = keys
    write_db, read_db = databases
    port = free_port()
    argv = [sys.executable, "-m", "kessai_cli", "command-api", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", str(workers)]
    with contextlib.ExitStack() as stack:
        e2e = None
        if end_to_end:
            task = progress.add_task("starting broker, relay, projector, query API")
            pipeline = stack.enter_context(Pipeline.running(env, home))
            counter = stack.enter_context(AppliedCounter(stores, read_db))
            e2e = EndToEnd(
                pipeline,
                read_key,
                counter,
                lambda: scalar_of(
                    stores,
                    write_db,
                    "SELECT COUNT(*) FROM events WHERE event_type = 'PaymentCaptured'",
                ),
            )
            progress.remove_task(task)
        api = stack.enter_context(served(argv, env, port, home / "command-api.log"))
        task = progress.add_task("funding the payers' wallets")
        payers = [*loadgen.payers(loadgen.Mix(users=users)), *PROBE_PAYERS]
        funding = fund_payers(api.url, wallets_key, payers)
        if e2e is not None:  # the read side applies the top-ups before anything is measured
            progress.update(task, description="the read side applying the top-ups")
            if not _wait_for(
                lambda: scalar_of(stores, read_db, "SELECT COUNT(*) FROM wallets") >= len(payers)
            ):
                raise RuntimeError("the read side did not apply the top-ups within 300 s")
        progress.remove_task(task)
        figures = measure(api, key, label="kessai", profile=profile, e2e=e2e)
        return {**figures, "funding": funding}


def _wait_for(condition: Callable[[], bool], timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _measure_bare(
    measure: functools.partial[dict[str, Any]],
    home: Path,
    env: dict[str, str],
    key: str,
    workers: int,
) -> dict[str, Any]:
    """The baseline: ``bench/bare_app.py`` served and driven the same way."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.bare_app:create_app", "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", "warning", "--no-access-log"]
    with served(argv, env, port, home / "bare.log") as bare:
        return measure(bare, key, label="bare FastAPI")


def _ratios(report: dict[str, Any]) -> dict[str, float | None]:
    k, b, r = report["kessai"], report["bare_fastapi"], report["raw_inserts"]
    return {
        "kessai_vs_bare": round(k["ok_per_second"] / b["ok_per_second"], 3)
        if b["ok_per_second"]
        else None,
        "kessai_accepted_vs_raw_inserts": round(
            k["accepted_per_second"] / r["inserts_per_second"], 3
        )
        if r["inserts_per_second"]
        else None,
    }


def show(report: dict[str, Any]) -> None:
    m, s = report["machine"], report["settings"]
    about = machine_table(m)
    about.add_row(
        "run",
        f"{s['connections']} connections, {s['seconds']:g} s (+{s['warmup_seconds']:g} s "
        f"warm-up), {s['workers']} uvicorn workers, group commit {s['group_commit']}",
    )
    funding = report["kessai"].get("funding")
    if funding is not None:
        about.add_row(
            "funding",
            f"{funding['funded']:,} payers' wallets topped up ({funding['amount']:,} JPY each) "
            f"in {funding['elapsed_seconds']:.1f} s, before the kessai runs",
        )
    console.print(about)
    console.print(_figures_table(report))
    console.print(_targets_table(report))


def _met(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def _figures_table(report: dict[str, Any]) -> Table:
    table = Table(
        title="POST /v1/payments, campaign mix (latencies in ms; RSS: peak of the largest process)"
    )
    for column in (
        "what", "ok/s", "accepted/s", "p50", "p90", "p99", "max", "non-2xx",
        "client CPU s", "API CPU s", "DB CPU s", "RSS MiB",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column == "what" else "right", no_wrap=column == "what"
        )
    for label, f in (("kessai", report["kessai"]), ("bare", report["bare_fastapi"])):
        bad = sum(v for k, v in f["by_status"].items() if not 200 <= int(k) < 300)
        table.add_row(
            label,
            f"{f['ok_per_second']:,.0f}",
            f"{f['accepted_per_second']:,.0f}",
            *(f"{f['latency_ms'][q]:.1f}" for q in ("p50", "p90", "p99", "max")),
            f"{bad + f['connection_errors']:,}",
            f"{f['client_cpu_seconds']:.1f}",
            f"{f['server_cpu_seconds']:.1f}",
            "-" if f["db_cpu_seconds"] is None else f"{f['db_cpu_seconds']:.1f}",
            f"{f['memory']['peak_rss_mib_max']:.0f}",
        )
    r = report["raw_inserts"]
    table.add_row(
        "raw inserts",
        f"{r['inserts_per_second']:,.0f}",
        f"{r['inserts_per_second']:,.0f}",
        *(f"{r['latency_ms'][q]:.1f}" for q in ("p50", "p90", "p99", "max")),
        "0",
        f"{r['client_cpu_seconds']:.1f}",
        "-",
        "-" if r["db_cpu_seconds"] is None else f"{r['db_cpu_seconds']:.1f}",
        "-",
    )
    return table


def _targets_table(report: dict[str, Any]) -> Table:
    s, k, ratios = report["settings"], report["kessai"], report["ratios"]
    targets = Table(title="kessai against the targets")
    for column in ("figure", "measured", "target", "met"):
        targets.add_column(column)
    vs_bare = ratios["kessai_vs_bare"]
    targets.add_row(
        "answers/s, kessai / bare FastAPI",
        "-" if vs_bare is None else f"{vs_bare:.2f}",
        f">= {TARGETS['kessai_vs_bare']:.2f}",
        _met(vs_bare is not None and vs_bare >= TARGETS["kessai_vs_bare"]),
    )
    targets.add_row(
        f"p99 at {s['connections']} connections",
        f"{k['latency_ms']['p99']:.1f} ms",
        f"< {TARGETS['p99_ms']:g} ms" + ("" if s["connections"] == 64 else " (at 64)"),
        _met(k["latency_ms"]["p99"] < TARGETS["p99_ms"]),
    )
    rss = k["memory"]["peak_rss_mib_max"]
    targets.add_row(
        "peak RSS of a command API process",
        f"{rss:.0f} MiB",
        f"< {TARGETS['rss_mib']:g} MB",
        _met(rss < TARGETS["rss_mib"]),
    )
    raw = ratios["kessai_accepted_vs_raw_inserts"]
    targets.add_row(
        "accepted/s, kessai / raw single-row inserts",
        "-" if raw is None else f"{raw:.2f}",
        "(no target)",
        "",
    )
    e2e = k.get("end_to_end")
    if e2e is not None:
        _end_to_end_rows(targets, e2e)
    return targets


def _end_to_end_rows(targets: Table, e2e: dict[str, Any]) -> None:
    lag = e2e["lag_ms"]["p99"]
    targets.add_row(
        f"end-to-end lag p99 ({e2e['seen']} probes; p50 {e2e['lag_ms']['p50']} ms)",
        "-" if lag is None else f"{lag:,.0f} ms",
        f"< {TARGETS['lag_p99_ms']:,.0f} ms",
        _met(
            lag is not None and lag < TARGETS["lag_p99_ms"] and not e2e["not_seen_within_timeout"]
        ),
    )
    targets.add_row(
        "applied/s (read side) / accepted payments/s",
        f"{e2e['applied_per_second']:,.0f}/s = {e2e['applied_vs_accepted_payments']}",
        "keeps pace",
        "",
    )
    caught = e2e["caught_up_seconds_after_load"]
    targets.add_row(
        "read side caught up after the load stopped",
        "not within 300 s" if caught is None else f"{caught:.1f} s",
        "",
        "",
    )
    for name, memory in e2e["memory"].items():
        peak = memory["peak_rss_mib_max"]
        targets.add_row(
            f"peak RSS of {name}",
            f"{peak:.0f} MiB",
            f"< {TARGETS['rss_mib']:g} MB",
            _met(peak < TARGETS["rss_mib"]),
        )


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
