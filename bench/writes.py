"""How many payments the command API takes, against what the same server and database do bare.

``python -m bench.writes [--connections 64] [--seconds 10] [--workers 2]
[--db-url mysql+pymysql://root@127.0.0.1:3306 | --db-url sqlite] [--api-only]
[--json out.json] [--profile out.txt]``

1. Creates fresh databases (write store, read database and key store, ``kessai_bench_<hex>_w``
   / ``_r`` / ``_k`` on the server, or SQLite files with ``--db-url sqlite``: the embedded
   default), migrates them, creates a ``payments:write`` key.
2. Unless ``--api-only``: starts a private embedded broker, the relay, the projector and the
   query API over those databases (``bench/lag.py``).
3. Serves the real command API (``kessai command-api --workers N``, uvicorn, group commit as
   configured, rate limits out of the way) in a subprocess, and drives it with the load
   generator (``kessai/loadgen.py``): ``--connections`` keep-alive connections for
   ``--seconds`` after ``--warmup`` seconds, campaign traffic (Zipf merchants, one with 30% of
   the payments, 3% refunds, 1% client retries with the same Idempotency-Key and body, device
   ids). Figures: answers/s, accepted/s (payments and refunds recorded), latency p50/p90/p99,
   CPU of this process (the client), of the API processes and of the database server, and the
   peak RSS of every API process (``VmHWM``). With the pipeline: the end-to-end lag of probe
   payments until the query API shows them (p50/p99), applied/s on the read side, the time
   the read side needs to catch up after the load, the peak RSS of every service.
4. Baselines in the same run, on the same machine: a bare FastAPI app with the same body
   models and no database (``bench/bare_app.py``), served and driven identically; and raw
   single-row ``INSERT`` + ``COMMIT`` from ``--connections`` threads into a table of the same
   database for ``--seconds``.
5. Prints the figures, their ratios to the baselines and the targets, and the machine; writes
   them as JSON with ``--json``; drops the databases, also on failure and Ctrl-C.

Client and servers share the machine's cores: the client's CPU is reported so a saturated
client shows (see the client's note in ``kessai/loadgen.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.lag import PROBE_MERCHANT, AppliedCounter, Pipeline, Prober, Probes
from bench.reconciler import DEFAULT_DB_URL, machine_table, process_cpu
from bench.stores import Stores, temporary_home
from kessai import loadgen
from kessai.auth import PAYMENTS_WRITE, create_key, merchant_scope
from kessai.broker import free_port
from kessai.db import create_db_engine
from kessai.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
UNLIMITED = "1000000/second"
TARGETS = {
    "kessai_vs_bare": 0.70,
    "p99_ms": 50.0,
    "rss_mib": 200.0,
    "lag_p99_ms": 1000.0,
}
"""create-payment >= 70% of the bare POST rate; p99 < 50 ms at 64 connections; RSS < 200 MB;
end-to-end lag p99 < 1 s."""

console = Console(width=None if sys.stdout.isatty() else 120)


# -- serving -----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (uvicorn's worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def memory_kib(pid: int, field: str) -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of ``pid``, in KiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


class Served:
    """A uvicorn server in a subprocess (the supervisor and its workers)."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the server did not come up: {self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def pids(self) -> list[int]:
        return [self.process.pid, *children_of(self.process.pid)]

    def cpu(self) -> float:
        return sum(process_cpu(pid) or 0.0 for pid in self.pids())

    def memory(self) -> dict[str, Any]:
        """Peak RSS of each process (MiB) and the sum of their RSS now."""
        peaks = {pid: memory_kib(pid, "VmHWM") for pid in self.pids()}
        now = [memory_kib(pid, "VmRSS") or 0 for pid in self.pids()]
        known = [kib for kib in peaks.values() if kib is not None]
        return {
            "peak_rss_mib_per_process": [round(kib / 1024, 1) for kib in known],
            "peak_rss_mib_max": round(max(known, default=0) / 1024, 1),
            "rss_mib_total": round(sum(now) / 1024, 1),
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def served(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[Served]:
    server = Served(argv, env, port, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def prepare_stores(
    stores: Stores, names: tuple[str, str, str], created: list[str], label: str, *scopes: str
) -> list[str]:
    """Create and migrate the bench's write store, key store and read database (``names``, in
    that order; each joins ``created`` as soon as it exists, so the caller's cleanup drops it
    whatever fails next), then one API key per scope, named ``label``: the keys, in order."""
    write_db, keys_db, read_db = names
    for db in names:
        stores.create(db)
        created.append(db)
    upgrade("write", stores.url(write_db))
    upgrade("keys", stores.url(keys_db))
    upgrade("read", stores.url(read_db))
    engine = create_db_engine(stores.url(keys_db), pool_size=1)
    try:
        return [create_key(engine, [scope], label)[1] for scope in scopes]
    finally:
        engine.dispose()


def served_env(home: Path, write_url: str, keys_url: str, read_url: str) -> dict[str, str]:
    """The environment of the served APIs: this process's, without its KESSAI_* settings but
    the group-commit ones, over the bench's databases, rate limits out of the way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
    env.update(
        {
            "KESSAI_HOME": str(home),
            "KESSAI_WRITE_DB_URL": write_url,
            "KESSAI_KEYS_DB_URL": keys_url,
            "KESSAI_READ_DB_URL": read_url,
            "KESSAI_RATE_LIMIT_PER_IP": UNLIMITED,
            "KESSAI_RATE_LIMIT_WRITES": UNLIMITED,
            "KESSAI_RATE_LIMIT_READS": UNLIMITED,
            "KESSAI_LOG_LEVEL": "WARNING",
        }
    )
    for setting in ("GROUP_COMMIT", "GROUP_COMMIT_MAX_BATCH", "GROUP_COMMIT_MAX_DELAY_MS"):
        if f"KESSAI_{setting}" in os.environ:
            env[f"KESSAI_{setting}"] = os.environ[f"KESSAI_{setting}"]
    return env


# -- measuring ---------------------------------------------------------------------------------


@dataclasses.dataclass
class EndToEnd:
    """What ``drive`` needs to measure the read side behind the command API."""

    pipeline: Pipeline
    read_key: str
    counter: AppliedCounter
    write_payments: Callable[[], int]
    """Payments in the write store now."""


def drive(
    server: Served,
    key: str,
    *,
    connections: int,
    seconds: float,
    warmup: float,
    seed: int,
    mysqld: int | None,
    progress: Progress,
    label: str,
    profile: Path | None = None,
    e2e: EndToEnd | None = None,
) -> dict[str, Any]:
    """Warm up, then run the load generator against ``server``; the figures of the run.

    With ``profile``, py-spy samples the server's processes during the measured seconds. With
    ``e2e``, probes time how long payments take to show on the query API meanwhile, and the
    read side's progress is sampled (``bench/lag.py``).
    """
    mix = loadgen.Mix(seed=seed)
    task = progress.add_task(f"{label}: warming up", total=None)

    def on_progress(result: loadgen.Result, elapsed: float) -> None:
        rate = len(result.latencies) / elapsed if elapsed else 0.0
        progress.update(
            task,
            description=f"{label}: {elapsed:4.1f}/{seconds:g} s, {result.sent:,} sent, "
            f"{rate:,.0f}/s, {result.connection_errors} errors",
        )

    try:
        if warmup > 0:
            loadgen.run_sync(
                loadgen.Run(server.url, key, connections=connections, duration=warmup),
                loadgen.Mix(seed=seed + 1),
            )
        server_cpu, db_cpu = server.cpu(), process_cpu(mysqld)
        plan = loadgen.Run(server.url, key, connections=connections, duration=seconds)
        prober = (
            None if e2e is None else Prober(server.url, key, e2e.pipeline.query_url, e2e.read_key)
        )

        async def load() -> tuple[loadgen.Result, Probes | None]:
            if prober is None:
                return await loadgen.run(plan, mix, on_progress), None
            return await asyncio.gather(loadgen.run(plan, mix, on_progress), prober.run(seconds))

        started = time.perf_counter()
        with sampling(server, profile, seconds):
            result, probes = asyncio.run(load())
        ended = started + result.elapsed
        server_cpu = server.cpu() - server_cpu
        db_after = process_cpu(mysqld)
        memory = server.memory()
        if e2e is not None:
            progress.update(task, description=f"{label}: waiting for the read side")
            applied = e2e.counter.count_at(ended) - e2e.counter.count_at(started)
            recorded = e2e.write_payments()
            caught_up = e2e.counter.wait_for(recorded, timeout=300)
    finally:
        progress.remove_task(task)
    summary = result.summary()
    if e2e is not None and probes is not None:
        summary["end_to_end"] = {
            **probes.summary(),
            "applied_per_second": round(applied / result.elapsed, 1),
            "applied_vs_accepted_payments": round(applied / (result.payments + probes.sent), 3)
            if result.payments
            else None,
            "payments_in_write_store": recorded,
            "caught_up_seconds_after_load": None if caught_up is None else round(caught_up, 2),
            "memory": {name: p.memory() for name, p in e2e.pipeline.processes.items()},
        }
    ok = sum(v for k, v in result.by_status.items() if 200 <= k < 300)
    summary["ok_per_second"] = round(ok / result.elapsed, 1) if result.elapsed else 0.0
    summary["server_cpu_seconds"] = round(server_cpu, 2)
    summary["db_cpu_seconds"] = (
        None if db_cpu is None or db_after is None else round(db_after - db_cpu, 2)
    )
    summary["memory"] = memory
    summary["hot_merchant_share"] = (
        round(result.per_merchant[loadgen.merchant_id(0)] / result.payments, 3)
        if result.payments
        else None
    )
    return summary


def scalar_of(stores: Stores, database: str, sql: str) -> int:
    with stores.cursor(database) as (_, cursor):
        cursor.execute(sql)
        row = cursor.fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def sampling(server: Served, path: Path | None, seconds: float) -> Iterator[None]:
    """py-spy over the server and its workers while the block runs (``--profile``).

    The format follows the suffix: ``.svg`` flame graph, ``.json`` speedscope, anything else
    collapsed stacks (one line per stack, the form to grep and sum).
    """
    if path is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    argv = [str(spy), "record", "--pid", str(server.process.pid), "--subprocesses", "--gil"]
    argv += ["--rate", "200", "--format", fmt, "--output", str(path), "--nonblocking"]
    argv += ["--duration", str(max(1, round(seconds)))]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0:
            console.print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")


def raw_inserts(
    stores: Stores, database: str, *, connections: int, seconds: float, mysqld: int | None
) -> dict[str, Any]:
    """Single-row INSERT + COMMIT from ``connections`` threads for ``seconds``."""
    with stores.cursor(database) as (conn, cur):
        cur.execute(
            "CREATE TABLE bench_inserts (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " merchant_id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL,"
            " body VARCHAR(1024) NOT NULL, created_at TEXT NOT NULL)"
            if stores.sqlite
            else "CREATE TABLE bench_inserts (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " merchant_id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL,"
            " body VARCHAR(1024) NOT NULL, created_at DATETIME(6) NOT NULL)"
        )
        conn.commit()
    p = stores.param
    now_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now')" if stores.sqlite else "NOW(6)"
    insert = (
        "INSERT INTO bench_inserts (merchant_id, amount, body, created_at)"
        f" VALUES ({p}, {p}, {p}, {now_sql})"
    )
    body = orjson.dumps(
        {"merchant_id": "m00000", "user_id": "u1", "amount": 1200, "method": "balance"}
    ).decode()
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(connections + 1)
    stop_at = [0.0]

    def work(mine: list[float]) -> None:
        try:
            with stores.cursor(database) as (c, cursor):
                start_line.wait()
                while (now := time.perf_counter()) < stop_at[0]:
                    cursor.execute(insert, ("m00000", 1200, body))
                    c.commit()
                    mine.append(time.perf_counter() - now)
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                start_line.abort()

    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in latencies]
    for t in threads:
        t.start()
    cpu, db_cpu = time.process_time(), process_cpu(mysqld)
    stop_at[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    db_after = process_cpu(mysqld)
    if errors:
        raise RuntimeError(f"raw inserts failed: {errors[0]!r}") from errors[0]
    every = sorted(x for mine in latencies for x in mine)

    def pct(q: float) -> float:
        return round(every[min(len(every) - 1, max(0, round(q * len(every)) - 1))] * 1000, 2)

    return {
        "inserts": len(every),
        "elapsed_seconds": round(elapsed, 3),
        "inserts_per_second": round(len(every) / elapsed, 1),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "client_cpu_seconds": round(time.process_time() - cpu, 2),
        "db_cpu_seconds": None
        if db_cpu is None or db_after is None
        else round(db_after - db_cpu, 2),
    }


# -- the command -------------------------------------------------------------------------------


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
    signal.signal(signal.SIGTERM, _interrupt)
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    write_db, keys_db, read_db = f"{name}_w", f"{name}_k", f"{name}_r"
    home = temporary_home(db_url, "kessai-bench-writes-")
    stores = Stores(db_url, home)
    write_url, keys_url, read_url = (stores.url(db) for db in (write_db, keys_db, read_db))
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "connections": connections,
            "seconds": seconds,
            "warmup_seconds": warmup,
            "workers": workers,
            "seed": seed,
            "mix": dataclasses.asdict(loadgen.Mix(seed=seed)),
            "end_to_end": end_to_end,
        },
        "targets": TARGETS,
        "directory": str(home),
    }
    mysqld = stores.server_pid()
    created: list[str] = []
    try:
        key, read_key = prepare_stores(
            stores,
            (write_db, keys_db, read_db),
            created,
            "bench.writes",
            PAYMENTS_WRITE,
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
                mysqld=mysqld,
                progress=progress,
            )
            port = free_port()
            argv = [sys.executable, "-m", "kessai.cli", "command-api", "--host", "127.0.0.1"]
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
                report["kessai"] = measure(api, key, label="kessai", profile=profile, e2e=e2e)
            port = free_port()
            argv = [sys.executable, "-m", "uvicorn", "bench.bare_app:create_app", "--factory"]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
            argv += ["--log-level", "warning", "--no-access-log"]
            with served(argv, env, port, home / "bare.log") as bare:
                report["bare_fastapi"] = measure(bare, key, label="bare FastAPI")
            task = progress.add_task(f"raw inserts: {seconds:g} s", total=None)
            report["raw_inserts"] = raw_inserts(
                stores, write_db, connections=connections, seconds=seconds, mysqld=mysqld
            )
            progress.remove_task(task)
        k, b, r = report["kessai"], report["bare_fastapi"], report["raw_inserts"]
        report["ratios"] = {
            "kessai_vs_bare": round(k["ok_per_second"] / b["ok_per_second"], 3)
            if b["ok_per_second"]
            else None,
            "kessai_accepted_vs_raw_inserts": round(
                k["accepted_per_second"] / r["inserts_per_second"], 3
            )
            if r["inserts_per_second"]
            else None,
        }
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        for db in created:
            with contextlib.suppress(Exception):
                stores.drop(db)
        # The logs too: a failure's message already carries the tail of the log that says why.
        shutil.rmtree(home, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def show(report: dict[str, Any]) -> None:
    m, s = report["machine"], report["settings"]
    about = machine_table(m)
    about.add_row(
        "run",
        f"{s['connections']} connections, {s['seconds']:g} s (+{s['warmup_seconds']:g} s "
        f"warm-up), {s['workers']} uvicorn workers, group commit {s['group_commit']}",
    )
    console.print(about)
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
    console.print(table)
    k, ratios = report["kessai"], report["ratios"]
    targets = Table(title="kessai against the targets")
    for column in ("figure", "measured", "target", "met"):
        targets.add_column(column)

    def met(ok: bool) -> str:
        return "[green]yes[/green]" if ok else "[red]no[/red]"

    vs_bare = ratios["kessai_vs_bare"]
    targets.add_row(
        "answers/s, kessai / bare FastAPI",
        "-" if vs_bare is None else f"{vs_bare:.2f}",
        f">= {TARGETS['kessai_vs_bare']:.2f}",
        met(vs_bare is not None and vs_bare >= TARGETS["kessai_vs_bare"]),
    )
    targets.add_row(
        f"p99 at {s['connections']} connections",
        f"{k['latency_ms']['p99']:.1f} ms",
        f"< {TARGETS['p99_ms']:g} ms" + ("" if s["connections"] == 64 else " (at 64)"),
        met(k["latency_ms"]["p99"] < TARGETS["p99_ms"]),
    )
    rss = k["memory"]["peak_rss_mib_max"]
    targets.add_row(
        "peak RSS of a command API process",
        f"{rss:.0f} MiB",
        f"< {TARGETS['rss_mib']:g} MB",
        met(rss < TARGETS["rss_mib"]),
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
        lag = e2e["lag_ms"]["p99"]
        targets.add_row(
            f"end-to-end lag p99 ({e2e['seen']} probes; p50 {e2e['lag_ms']['p50']} ms)",
            "-" if lag is None else f"{lag:,.0f} ms",
            f"< {TARGETS['lag_p99_ms']:,.0f} ms",
            met(
                lag is not None
                and lag < TARGETS["lag_p99_ms"]
                and not e2e["not_seen_within_timeout"]
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
                met(peak < TARGETS["rss_mib"]),
            )
    console.print(targets)


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
