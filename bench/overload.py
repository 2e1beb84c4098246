"""The command API driven at ten times what it can serve: shed, or queued until clients time out.

``python -m bench.overload [--factor 10] [--seconds 10] [--connections 512] [--workers 2]
[--timeout 10] [--pin 0:1] [--db-url mysql+pymysql://root@127.0.0.1:3306 | --db-url sqlite]
[--json out.json]``

1. Creates fresh databases and a ``payments:write`` key as ``bench/writes.py`` does
   (``bench.stores.prepare_stores``).
2. The baseline: serves the real command API (``kessai command-api --workers N``; rate limits
   out of the way) with shedding out of the way (``KESSAI_OVERLOAD_MAX_IN_FLIGHT=10000``) and
   measures its capacity: closed loop over ``--capacity-connections`` for
   ``--capacity-seconds`` after ``--warmup``, campaign traffic (``kessai loadgen``): answered
   2xx per second. Then drives it open loop at ``--factor`` times that capacity for
   ``--seconds`` over ``--connections`` keep-alive connections (``kessai/loadgen.py``:
   latency counts from when a request was due). A client gives up on a request after
   ``--timeout`` seconds: an answer that late, or a request still unsent that long after it
   was due, is a client time-out.
3. Serves the same API on the same databases with its load-shedding settings as configured
   (``KESSAI_OVERLOAD_*`` of this process's environment, the defaults otherwise), warms it up
   and drives it with the same open loop at the same rate.
4. One open loop each, the baseline first, a minute apart: compare the two columns of one
   run, never figures across runs (the machine is shared, and each run grows the database).
5. Reports for each: the admitted (2xx) requests' p50/p99, the refusals' (5xx and 429; other
   4xx are answers about the request, counted apart) p50/p99, client
   time-outs, the share of refusals that are 503 or 429 with ``Retry-After`` (a client can
   act on them), and payments committed whose 201 the client never saw (the write store's
   count against the 201s received); the ratios of the two, against the targets (admitted p99
   < 100 ms, no time-out, every refusal with Retry-After). Drops the databases.

Unpinned, client and server share the machine's cores: the client takes CPU from the server,
and at ten times the capacity it may not keep up itself; its CPU and the rate it actually sent
are reported so that shows. ``--pin SERVER:CLIENT`` (``taskset -c`` CPU lists, e.g. ``0:1``
with ``--workers 1`` on two cores) runs the server on the first CPUs and this process, the
client, on the others, so neither takes the other's CPU (the database server stays where it
is).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.reconciler import DEFAULT_DB_URL, machine_table
from bench.serving import interrupt, served, served_env
from bench.stores import Stores, prepare_stores, scalar_of, temporary_home
from kessai import loadgen
from kessai.auth import PAYMENTS_WRITE
from kessai.broker import free_port

console = Console(width=None if sys.stdout.isatty() else 120)

TARGETS = {"admitted_p99_ms": 100.0, "client_timeouts": 0, "refusals_with_retry_after": 1.0}
UNBOUNDED = "10000"
"""``KESSAI_OVERLOAD_MAX_IN_FLIGHT`` of the baseline: a bound the run never reaches."""
COUNT_PAYMENTS = "SELECT COUNT(*) FROM events WHERE event_type = 'PaymentCaptured'"


class GivingUp(loadgen.Schedule):
    """Open loop, except that a request overdue by more than ``give_up`` seconds when a
    connection is free for it is not sent: its client has given up (a time-out). Without
    this, a server that cannot keep up makes the run last until it has served every request
    ever due."""

    def __init__(self, rate: float, duration: float, give_up: float) -> None:
        super().__init__(rate, duration)
        self.give_up = give_up
        self.abandoned = 0

    async def next(self) -> float | None:
        while (due := await super().next()) is not None:
            if time.perf_counter() - due <= self.give_up:
                return due
            self.abandoned += 1
        return None


@dataclasses.dataclass
class Tally:
    admitted: list[float] = dataclasses.field(default_factory=list)
    refused: list[float] = dataclasses.field(default_factory=list)
    by_status: Counter[int] = dataclasses.field(default_factory=Counter)
    by_code: Counter[str] = dataclasses.field(default_factory=Counter)
    actionable: int = 0
    """Refusals that are 503 or 429 with Retry-After."""
    other: int = 0
    """4xx answers other than 429."""
    late: int = 0
    """Answers that came after the client's time-out."""
    payments_seen: int = 0
    """Payments the client saw created (201, not a replay) within its time-out."""

    def observe(self, timeout: float) -> loadgen.Observer:
        def observe(kind: str, answer: loadgen.Answer, seconds: float) -> None:
            self.by_status[answer.status] += 1
            if seconds > timeout:
                self.late += 1
            if 200 <= answer.status < 300:
                self.admitted.append(seconds)
                if kind == "payment" and answer.status == 201 and not answer.replayed:
                    self.payments_seen += seconds <= timeout
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.by_code[orjson.loads(answer.body)["error"]["code"]] += 1
            if answer.status < 500 and answer.status != 429:
                # An answer about the request itself, not the load: e.g. a client retry
                # finding its first attempt still in flight (409).
                self.other += 1
                return
            self.refused.append(seconds)
            if answer.status in (429, 503) and answer.retry_after:
                self.actionable += 1

        return observe


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 1)


def open_loop(
    url: str, key: str, rate: float, seconds: float, connections: int, timeout: float, seed: int
) -> tuple[dict[str, Any], int]:
    """One open-loop run; its figures and the payments the client saw created."""
    tally = Tally()
    schedule = GivingUp(rate, seconds, timeout)
    plan = loadgen.Run(url, key, connections=connections, rate=rate, duration=seconds)
    plan = dataclasses.replace(plan, timeout=timeout)
    result = asyncio.run(
        loadgen.run(plan, loadgen.Mix(seed=seed), schedule=schedule, observe=tally.observe(timeout))
    )
    refusals = len(tally.refused)
    timeouts = result.connection_errors + schedule.abandoned + tally.late
    figures = {
        "offered_per_second": round(rate, 1),
        "sent": result.sent,
        "sent_per_second": round(result.sent / result.elapsed, 1) if result.elapsed else 0.0,
        "elapsed_seconds": round(result.elapsed, 2),
        "by_status": {str(k): v for k, v in sorted(tally.by_status.items())},
        "refusal_codes": dict(tally.by_code.most_common()),
        "admitted": len(tally.admitted),
        "admitted_per_second": round(len(tally.admitted) / result.elapsed, 1)
        if result.elapsed
        else 0.0,
        "admitted_latency_ms": {
            "p50": percentile_ms(tally.admitted, 0.5),
            "p99": percentile_ms(tally.admitted, 0.99),
        },
        "refused": refusals,
        "other_4xx": tally.other,
        "refused_latency_ms": {
            "p50": percentile_ms(tally.refused, 0.5),
            "p99": percentile_ms(tally.refused, 0.99),
        },
        "refusals_with_retry_after": round(tally.actionable / refusals, 4) if refusals else None,
        "client_timeouts": timeouts,
        "timeouts_detail": {
            "no_answer": result.connection_errors,
            "never_sent": schedule.abandoned,
            "answered_too_late": tally.late,
        },
        "client_cpu_seconds": round(result.client_cpu_seconds, 2),
    }
    return figures, tally.payments_seen


def main(
    factor: Annotated[float, typer.Option(min=1, help="Open-loop rate / capacity.")] = 10.0,
    seconds: Annotated[float, typer.Option(min=1, help="Open-loop seconds per run.")] = 10.0,
    connections: Annotated[int, typer.Option(min=1, help="Open-loop connections.")] = 512,
    capacity_seconds: Annotated[
        float, typer.Option(min=1, help="Closed-loop seconds measuring the capacity.")
    ] = 5.0,
    capacity_connections: Annotated[
        int, typer.Option(min=1, help="Closed-loop connections measuring the capacity.")
    ] = 64,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first.")] = 2.0,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds after which a client gives up.")
    ] = 10.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    db_url: Annotated[
        str,
        typer.Option(help="Server URL (no database), or 'sqlite' for the embedded default."),
    ] = DEFAULT_DB_URL,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    pin: Annotated[
        str | None,
        typer.Option(
            help="SERVER:CLIENT CPU lists (taskset -c syntax), e.g. 0:1: the server on the "
            "first, this process (the client) on the second, so neither takes the other's CPU."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
) -> None:
    """Drive the command API at a multiple of its capacity, with shedding and without."""
    server_cpus, client_cpus = pinning(pin)  # a wrong --pin is refused before anything is made
    signal.signal(signal.SIGTERM, interrupt)
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    write_db, keys_db, read_db = f"{name}_w", f"{name}_k", f"{name}_r"
    home = temporary_home(db_url, "kessai-bench-overload-")
    stores = Stores(db_url, home)
    write_url, keys_url, read_url = (stores.url(db) for db in (write_db, keys_db, read_db))
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": {
            "factor": factor,
            "seconds": seconds,
            "connections": connections,
            "capacity_seconds": capacity_seconds,
            "capacity_connections": capacity_connections,
            "warmup_seconds": warmup,
            "timeout_seconds": timeout,
            "workers": workers,
            "seed": seed,
            "pin": pin,
        },
        "targets": TARGETS,
        "directory": str(home),
    }
    created: list[str] = []
    affinity = os.sched_getaffinity(0)
    try:
        if client_cpus is not None:
            os.sched_setaffinity(0, client_cpus)
        (key,) = prepare_stores(
            stores, (write_db, keys_db, read_db), created, "bench.overload", PAYMENTS_WRITE
        )
        env = served_env(home, write_url, keys_url, read_url)
        shedding = {k: v for k, v in os.environ.items() if k.startswith("KESSAI_OVERLOAD_")}
        env.update(shedding)  # the settings under test, defaults otherwise
        report["settings"]["shedding_env"] = shedding
        baseline_env = {**env, "KESSAI_OVERLOAD_MAX_IN_FLIGHT": UNBOUNDED}

        def payments() -> int:
            return scalar_of(stores, write_db, COUNT_PAYMENTS)

        with Progress(
            TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("serving the command API", total=None)
            rate = 0.0
            # The baseline first: its closed loop is the capacity (with shedding on, a closed
            # loop past the bound would measure the bound instead).
            for label, server_env in (("baseline", baseline_env), ("shedding", env)):
                port = free_port()
                argv = [sys.executable, "-m", "kessai.cli", "command-api", "--host", "127.0.0.1"]
                argv += ["--port", str(port), "--workers", str(workers)]
                if server_cpus is not None:
                    argv = ["taskset", "-c", server_cpus, *argv]
                with served(argv, server_env, port, home / f"{label}.log") as api:
                    if warmup > 0:
                        progress.update(task, description=f"{label}: warming up")
                        loadgen.run_sync(
                            loadgen.Run(
                                api.url, key, connections=capacity_connections, duration=warmup
                            ),
                            loadgen.Mix(seed=seed + 1),
                        )
                    if label == "baseline":
                        progress.update(task, description="capacity: closed loop")
                        closed = loadgen.run_sync(
                            loadgen.Run(
                                api.url, key, connections=capacity_connections,
                                duration=capacity_seconds,
                            ),
                            loadgen.Mix(seed=seed + 2),
                        )  # fmt: skip
                        ok = sum(v for k, v in closed.by_status.items() if 200 <= k < 300)
                        capacity = ok / closed.elapsed
                        report["capacity"] = {
                            "ok_per_second": round(capacity, 1),
                            "latency_ms": closed.summary()["latency_ms"],
                            "by_status": {str(k): v for k, v in closed.by_status.items()},
                        }
                        rate = capacity * factor
                    progress.update(
                        task, description=f"{label}: open loop at {rate:,.0f}/s for {seconds:g} s"
                    )
                    before, cpu = payments(), api.cpu()
                    figures, seen = open_loop(
                        api.url, key, rate, seconds, connections, timeout, seed
                    )
                    figures["server_cpu_seconds"] = round(api.cpu() - cpu, 2)
                    figures["payments_committed_unseen"] = settled(payments) - before - seen
                    report[label] = figures
            progress.remove_task(task)
        s, b = report["shedding"], report["baseline"]
        report["ratios"] = {
            "admitted_p99": _ratio(
                s["admitted_latency_ms"]["p99"], b["admitted_latency_ms"]["p99"]
            ),
            "refused_p50_vs_admitted_p99": _ratio(
                s["refused_latency_ms"]["p50"], s["admitted_latency_ms"]["p99"]
            ),
            "admitted_per_second": _ratio(s["admitted_per_second"], b["admitted_per_second"]),
            "admitted_per_second_vs_capacity": _ratio(
                s["admitted_per_second"], report["capacity"]["ok_per_second"]
            ),
        }
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if json_path is not None:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {json_path}")
    finally:
        os.sched_setaffinity(0, affinity)
        for db in created:
            with contextlib.suppress(Exception):
                stores.drop(db)
        shutil.rmtree(home, ignore_errors=True)


def pinning(pin: str | None) -> tuple[str | None, set[int] | None]:
    """``--pin SERVER:CLIENT``: the server's CPU list as taskset takes it, the client's CPUs."""
    if pin is None:
        return None, None
    server, sep, client = pin.partition(":")
    if not sep or not server or not client:
        raise typer.BadParameter("give SERVER:CLIENT CPU lists, e.g. 0:1", param_hint="--pin")
    cpus: set[int] = set()
    try:
        for part in client.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise typer.BadParameter(f"not a CPU list: {client}", param_hint="--pin") from None
    return server, cpus


def settled(count: Callable[[], int], within: float = 30.0) -> int:
    """``count()`` once it stopped changing: requests the server was still working on when
    the client stopped are committed meanwhile."""
    last, deadline = count(), time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = count()
        if now == last:
            return now
        last = now
    return last


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def show(report: dict[str, Any]) -> None:
    st = report["settings"]
    about = machine_table(report["machine"])
    about.add_row(
        "run",
        f"capacity: {st['capacity_connections']} connections closed loop, "
        f"{st['capacity_seconds']:g} s; then {st['factor']:g}x that open loop over "
        f"{st['connections']} connections for {st['seconds']:g} s; client time-out "
        f"{st['timeout_seconds']:g} s; {st['workers']} uvicorn workers"
        + (
            f"; server pinned to CPU {st['pin'].partition(':')[0]}, "
            f"client to CPU {st['pin'].partition(':')[2]}"
            if st.get("pin")
            else "; client and server unpinned (they share the cores)"
        ),
    )
    console.print(about)
    cap = report["capacity"]
    console.print(
        f"capacity (closed loop): {cap['ok_per_second']:,.0f} ok/s, "
        f"p99 {cap['latency_ms']['p99']} ms"
    )
    table = Table(title="open loop past capacity (latencies in ms, from when a request was due)")
    for column in (
        "server", "offered/s", "sent/s", "admitted/s", "admitted p50", "admitted p99",
        "refused", "refused p50", "refused p99", "with Retry-After", "time-outs",
        "unseen commits", "client CPU s",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "server" else "right")
    for label in ("shedding", "baseline"):
        f = report[label]
        share = f["refusals_with_retry_after"]
        table.add_row(
            label,
            f"{f['offered_per_second']:,.0f}",
            f"{f['sent_per_second']:,.0f}",
            f"{f['admitted_per_second']:,.0f}",
            _ms(f["admitted_latency_ms"]["p50"]),
            _ms(f["admitted_latency_ms"]["p99"]),
            f"{f['refused']:,}",
            _ms(f["refused_latency_ms"]["p50"]),
            _ms(f["refused_latency_ms"]["p99"]),
            "-" if share is None else f"{share:.1%}",
            f"{f['client_timeouts']:,}",
            f"{f['payments_committed_unseen']:,}",
            f"{f['client_cpu_seconds']:.1f}",
        )
    console.print(table)
    s, r = report["shedding"], report["ratios"]
    targets = Table(title="with shedding, against the targets (baseline: without, same run)")
    for column in ("figure", "measured", "baseline", "target", "met"):
        targets.add_column(column)

    def met(ok: bool) -> str:
        return "[green]yes[/green]" if ok else "[red]no[/red]"

    p99 = s["admitted_latency_ms"]["p99"]
    b = report["baseline"]
    targets.add_row(
        "admitted p99",
        f"{_ms(p99)} ms ({r['admitted_p99']} x baseline)",
        f"{_ms(b['admitted_latency_ms']['p99'])} ms",
        f"< {TARGETS['admitted_p99_ms']:g} ms",
        met(p99 is not None and p99 < TARGETS["admitted_p99_ms"]),
    )
    targets.add_row(
        "client time-outs",
        f"{s['client_timeouts']:,}",
        f"{b['client_timeouts']:,}",
        "0",
        met(s["client_timeouts"] == 0),
    )
    share = s["refusals_with_retry_after"]
    targets.add_row(
        "refusals that are 503/429 with Retry-After",
        "-" if share is None else f"{share:.1%} of {s['refused']:,}",
        "-"
        if b["refusals_with_retry_after"] is None
        else f"{b['refusals_with_retry_after']:.1%} of {b['refused']:,}",
        "all",
        met(share is None or share == 1.0),
    )
    targets.add_row(
        "payments committed whose 201 the client never saw",
        f"{s['payments_committed_unseen']:,}",
        f"{b['payments_committed_unseen']:,}",
        "",
        "",
    )
    targets.add_row(
        "admitted/s, shedding / baseline",
        f"{r['admitted_per_second']}",
        "",
        "",
        "",
    )
    console.print(targets)


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
