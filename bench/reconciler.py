"""How long the reconciler takes over a large store, against what touching the same data costs.

``python -m bench.reconciler [--events 1000000] [--db-url mysql+pymysql://root@127.0.0.1:3306]
[--json out.json]``

1. Creates two fresh databases on the server (write store and read database,
   ``kessai_bench_<hex>_w`` / ``_r``), migrates them with ``migrations.upgrade``.
2. Loads a consistent state in bulk: ``--events`` events in the write store (payments captured
   over ``--days`` days, some refunded once or twice; one merchant holds 30% of the payments;
   bodies built with the real event classes, ids from ``kessai.ids.new_id`` in time order; no
   outbox rows: everything is published), and the read side the projector would have written
   for them (payments, refunds, day and hour totals in each merchant's time zone, computed
   with ``kessai.ledger.apply`` as the projector does).
3. Measures, on the same data and in this order: the baseline (reading both sides in primary
   key pages through the raw driver), an incremental run with an empty watermark (every event
   is new), a full audit, the baseline again, reading + ``orjson.loads`` of every body,
   reading + ``kessai.events.parse_event`` of every body, and an incremental ``--dry-run``
   after deleting ``--drift`` read rows (restored afterwards): exactly those ``missing``, and
   about their totals (right) at most ``totals_unverified``. A consistent run that reports
   anything fails the benchmark: the loader is then wrong.
4. Prints the figures (seconds, events/s, ratio to the mean of the two baselines) and the
   machine, writes them as JSON with ``--json``; drops both databases (unless ``--keep``),
   also on failure and Ctrl-C.

``--db-url sqlite`` (or ``sqlite:///DIR``) runs the same on the embedded default: both
databases are SQLite files in a temporary directory (under DIR), removed at the end, loaded
through the stdlib ``sqlite3`` driver's ``executemany`` (one transaction per batch, times in
SQLite's text form), and the baseline reads them with the same driver; SQLite runs inside this
process, so there is no server CPU. The drift's rows are drawn in Python (no seeded ``RAND()``).

No broker is involved: the reconciler opens a producer only to repair findings, and a
consistent state has none (the bench points it at a closed port, so a loader bug fails fast).
``--profile FILE`` attaches py-spy (``pip install py-spy``) to this process for one run
(``--profile-run``: ``incremental``, ``full`` or ``drift``; ``.svg`` flame graph, ``.json``
speedscope, anything else collapsed stacks). ``--keep`` leaves the databases, and ``--reuse
NAME`` measures them again without loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kessai.db import create_db_engine
from kessai.events import (
    parse_event,
)
from kessai.settings import Settings
from migrations import upgrade
from reconciler.service import Reconciler, RunResult

if TYPE_CHECKING:  # bench.stores imports this module's server helpers
    from bench.stores import Stores

from bench.reconciler_data import (
    PAYMENT_COLUMNS,
    REFUND_COLUMNS,
    TOTAL_COLUMNS,
    Planned,
    Shape,
    _at,
    _naive,
    assign_ids,
    load,
    merchant_zones,
    plan,
    put_back,
    reset_watermark,
    take_drift,
)
from bench.reconciler_server import (
    DEFAULT_DB_URL,
    Figure,
    connect,
    create_database,
    database_url,
    drop_database,
    insert_sql,
    machine,
    machine_table,
    measured,
    process_cpu,
    sampling,
    scalar,
    scan,
    server_pid,
    sqlite_rows,
    sqlite_value,
)

# The other benches take their shared helpers from here.
__all__ = [
    "DEFAULT_DB_URL",
    "PAYMENT_COLUMNS",
    "REFUND_COLUMNS",
    "TOTAL_COLUMNS",
    "Planned",
    "Shape",
    "_at",
    "_naive",
    "assign_ids",
    "cli",
    "connect",
    "create_database",
    "database_url",
    "drop_database",
    "insert_sql",
    "machine",
    "machine_table",
    "main",
    "merchant_zones",
    "plan",
    "process_cpu",
    "server_pid",
    "sqlite_rows",
    "sqlite_value",
]

console = Console(width=None if sys.stdout.isatty() else 120)


# -- the runs ----------------------------------------------------------------------------------


def kinds(result: RunResult) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in result.findings:
        found[f.kind] = found.get(f.kind, 0) + 1
    return found


def run_reconciler(
    reconciler: Reconciler, *, full: bool, dry_run: bool, progress: Progress, label: str
) -> RunResult:
    task = progress.add_task(label, total=None)

    def on_progress(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    try:
        return asyncio.run(reconciler.run(full=full, dry_run=dry_run, progress=on_progress))
    finally:
        progress.remove_task(task)


# -- the command -------------------------------------------------------------------------------


def main(
    events: Annotated[int, typer.Option(min=1, help="Events in the write store.")] = 1_000_000,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; two databases are created there), or 'sqlite' "
            "(or sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(help="KESSAI_RECONCILE_CHUNK_SIZE for the runs (default: the setting)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days the payments are spread over.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set.")] = 7,
    drift: Annotated[
        int, typer.Option(min=0, help="Read rows deleted for the --dry-run figure (0: skip).")
    ] = 100,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for one run (.svg, .json, or collapsed stacks)."),
    ] = None,
    profile_run: Annotated[
        str, typer.Option(help="The run --profile samples: incremental, full or drift.")
    ] = "incremental",
    keep: Annotated[
        bool, typer.Option(help="Keep the databases (their names are printed).")
    ] = False,
    reuse: Annotated[
        str | None,
        typer.Option(
            help="Measure the databases NAME_w / NAME_r kept by an earlier --keep (on SQLite: "
            "DIR/NAME, the files' directory and name as --keep printed them)."
        ),
    ] = None,
) -> None:
    """Benchmark the reconciler: an incremental run over all events and a full audit."""
    # SIGTERM (and SIGINT, even where a shell started this with it ignored) unwinds like
    # Ctrl-C, so the databases are dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    stores, home, name, reuse = _stores_for(db_url, reuse)
    write_db, read_db = f"{name}_w", f"{name}_r"
    shape = Shape(events=events, seed=seed, days=days)
    report: dict[str, Any] = {"machine": stores.machine()}
    if home is not None:
        report["directory"] = str(home)
    created = reuse is None
    try:
        with _progress() as progress:
            report["data"] = _prepare(
                shape, stores, write_db, read_db, fresh=created, progress=progress, report=report
            )
            report["figures"] = measure(
                shape=shape,
                events=report["data"]["events"],
                stores=stores,
                write_db=write_db,
                read_db=read_db,
                chunk_size=chunk_size,
                drift=drift,
                profile=profile,
                profile_run=profile_run,
                progress=progress,
                report=report,
            )
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        _clean_up(db_url, stores, home, name, keep=keep, used=created or reuse is not None)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _stores_for(db_url: str, reuse: str | None) -> tuple[Stores, Path | None, str, str | None]:
    """The stores, the SQLite directory (None on a server), the databases' name, and ``reuse``
    as a name (on SQLite ``--reuse`` is DIR/NAME)."""
    from bench.stores import Stores, temporary_home

    home: Path | None = None
    if Stores(db_url, Path()).sqlite and reuse is not None:
        home, reuse = Path(reuse).parent, Path(reuse).name
    elif Stores(db_url, Path()).sqlite:
        home = temporary_home(db_url, "kessai-bench-reconciler-")
    stores = Stores(db_url, home or Path())
    return stores, home, reuse or f"kessai_bench_{uuid.uuid4().hex[:10]}", reuse


def _prepare(
    shape: Shape,
    stores: Stores,
    write_db: str,
    read_db: str,
    *,
    fresh: bool,
    progress: Progress,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Create, migrate and load both databases (``fresh``), or count what kept ones hold; return
    what the data set is."""
    write_url, read_url = stores.url(write_db), stores.url(read_db)
    events = shape.events
    if fresh:
        started = time.perf_counter()
        stores.create(write_db)
        stores.create(read_db)
        upgrade("write", write_url)
        upgrade("read", read_url)
        payments = load(shape, stores, write_db, read_db, progress)
        load_seconds = time.perf_counter() - started
        report["load"] = {
            "seconds": round(load_seconds, 2),
            "events_per_second": round(events / load_seconds),
        }
        console.print(f"loaded {events:,} events in {load_seconds:.1f} s")
    else:
        events = scalar(write_url, "SELECT COUNT(*) FROM events")
        payments = scalar(write_url, "SELECT COUNT(*) FROM events WHERE version = 1")
    return {
        "events": events,
        "payments": payments,
        "refunds": scalar(read_url, "SELECT COUNT(*) FROM refunds"),
        "merchants": scalar(read_url, "SELECT COUNT(DISTINCT merchant_id) FROM payments"),
        "days": shape.days,
        "seed": shape.seed,
        "databases": [write_db, read_db],
    }


def _clean_up(
    db_url: str, stores: Stores, home: Path | None, name: str, *, keep: bool, used: bool
) -> None:
    """Drop the databases (or the SQLite directory), unless ``keep``: then say how to reuse
    them."""
    write_db, read_db = f"{name}_w", f"{name}_r"
    if keep and home is not None:
        console.print(f"kept: --reuse {home / name}  ({write_db}.db, {read_db}.db)")
    elif keep:
        console.print(f"kept: --reuse {name}  ({write_db}, {read_db})")
    elif home is not None:
        shutil.rmtree(home, ignore_errors=True)
    elif used:
        for db in (write_db, read_db):
            with contextlib.suppress(Exception):
                drop_database(db_url, db)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def measure(
    *,
    shape: Shape,
    events: int,
    stores: Stores,
    write_db: str,
    read_db: str,
    chunk_size: int | None,
    drift: int,
    profile: Path | None,
    profile_run: str,
    progress: Progress,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    write_url, read_url = stores.url(write_db), stores.url(read_db)
    update: dict[str, object] = {
        "write_db_url": write_url,
        "read_db_url": read_url,
        # Nothing to repair in a consistent state; were there something, fail fast.
        "kafka_bootstrap": "127.0.0.1:9",
        "kafka_request_timeout_ms": 1_000,
        # No second look (it only re-checks suspects after a pause).
        "reconcile_confirm_seconds": 0.0,
    }
    if chunk_size is not None:
        update["reconcile_chunk_size"] = chunk_size
    settings = Settings().model_copy(update=update)
    report["settings"] = {
        "reconcile_chunk_size": settings.reconcile_chunk_size,
        "reconcile_confirm_seconds": settings.reconcile_confirm_seconds,
    }
    mysqld = stores.server_pid()
    figures: list[Figure] = []
    write_engine = create_db_engine(write_url)
    read_engine = create_db_engine(read_url, write=True)
    reconciler = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)

    def baseline(name: str, parse: Callable[[str], object] | None = None) -> None:
        task = progress.add_task(name, total=None)
        try:
            with measured(name, events, mysqld, figures):
                scan(stores, write_db, read_db, parse)
        finally:
            progress.remove_task(task)

    def reconcile(name: str, key: str, *, full: bool, dry_run: bool = False) -> RunResult:
        if not full:
            reset_watermark(read_url)
        with sampling(profile if key == profile_run else None):
            with measured(name, events, mysqld, figures) as figure:
                result = run_reconciler(
                    reconciler, full=full, dry_run=dry_run, progress=progress, label=name
                )
            figure.payments_checked = result.payments_checked
            figure.findings = kinds(result)
        return result

    try:
        _measure_runs(baseline, reconcile, read_url, drift=drift, seed=shape.seed)
    finally:
        write_engine.dispose()
        read_engine.dispose()
    return _with_ratios(figures, report)


def _measure_runs(
    baseline: Callable[..., None],
    reconcile: Callable[..., RunResult],
    read_url: str,
    *,
    drift: int,
    seed: int,
) -> None:
    """The runs, in order; a consistent state that is reported anything, or a drift not found
    exactly, fails the benchmark."""
    baseline("baseline (before)")
    for name, key, full in (
        ("incremental", "incremental", False),
        ("full audit", "full", True),
    ):
        result = reconcile(name, key, full=full)
        if result.findings or result.outcome != "consistent":
            raise RuntimeError(
                f"{name}: the loaded state is not consistent ({result.outcome}, "
                f"{kinds(result)}, {result.error}): first findings {result.findings[:5]}"
            )
    baseline("baseline (after)")
    baseline("read + orjson.loads", orjson.loads)
    baseline("read + parse_event", parse_event)
    if drift:
        payments, refunds = take_drift(read_url, drift, seed)
        try:
            result = reconcile("incremental, drift, --dry-run", "drift", full=False, dry_run=True)
        finally:
            put_back(read_url, payments, refunds)
        found = kinds(result)
        # The deleted rows' totals are right: the run may leave them unverified, never call
        # them wrong.
        if found.get("missing") != len(payments) or set(found) - {"missing", "totals_unverified"}:
            raise RuntimeError(f"drift: expected {len(payments)} missing, got {found}")


def _with_ratios(figures: list[Figure], report: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures as JSON rows, each with its ratio to the mean of the baselines."""
    base = [f.seconds for f in figures if f.name.startswith("baseline")]
    mean = sum(base) / len(base)
    report["baseline_seconds"] = round(mean, 3)
    out = []
    for f in figures:
        f.ratio = f.seconds / mean if mean > 0 else None
        row = asdict(f)
        row["events_per_second"] = round(f.events_per_second)
        for key in ("seconds", "client_cpu_seconds", "server_cpu_seconds", "ratio"):
            if row[key] is not None:
                row[key] = round(row[key], 3)
        out.append(row)
    return out


def show(report: dict[str, Any]) -> None:
    m = report["machine"]
    about = machine_table(m)
    d = report["data"]
    about.add_row(
        "data",
        f"{d['events']:,} events, {d['payments']:,} payments, {d['refunds']:,} refunds, "
        f"{d['days']} days",
    )
    if "load" in report:
        load = report["load"]
        about.add_row("load time", f"{load['seconds']} s ({load['events_per_second']:,} events/s)")
    about.add_row("chunk size", str(report["settings"]["reconcile_chunk_size"]))
    console.print(about)
    figures = Table(title=f"reconciler over {d['events']:,} events")
    for column in ("what", "seconds", "events/s", "x baseline", "client CPU s", "server CPU s"):
        figures.add_column(column, justify="left" if column == "what" else "right")
    figures.add_column("findings")
    for f in report["figures"]:
        figures.add_row(
            f["name"],
            f"{f['seconds']:.2f}",
            f"{f['events_per_second']:,}",
            f"{f['ratio']:.2f}" if f["ratio"] is not None else "-",
            f"{f['client_cpu_seconds']:.1f}",
            "-" if f["server_cpu_seconds"] is None else f"{f['server_cpu_seconds']:.1f}",
            _findings(f["findings"]),
        )
    console.print(figures)
    if str(m["database"]).startswith("SQLite"):
        console.print(
            "SQLite runs inside this process: its CPU is in the client CPU column; no server CPU."
        )


def _findings(found: dict[str, int] | None) -> str:
    if found is None:
        return "-"
    return ", ".join(f"{kind} {n}" for kind, n in sorted(found.items())) or "none"


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
