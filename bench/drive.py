"""Driving a served API with the load generator, and what a run measured.

``fund_payers`` tops up the wallets the traffic pays from, once per bench and before anything
is measured (a balance payment from a wallet nobody funded is 402). ``drive`` warms the server
up, runs ``kessai loadgen``'s traffic against it for the measured seconds, and returns the
figures: answers, latencies, CPU of client, server and database, peak RSS; with ``EndToEnd``,
how fast the read side shows the payments (``bench/lag.py``); with a profile path, py-spy
samples of the server (``sampling``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from bench.lag import AppliedCounter, Pipeline, Prober, Probes
from bench.reconciler import process_cpu
from bench.serving import Served
from kessai_cli import loadgen

console = Console(width=None if sys.stdout.isatty() else 120)

FUNDS = 10**9
"""Each payer's top-up before a bench: 40,000 of the load generator's payments (25,000 on
average), more than any run sends in all; within the served APIs' raised wallet limit
(``bench.serving.WALLET_LIMIT``)."""


def fund_payers(
    url: str, wallets_key: str, users: Sequence[str], *, connections: int = 64
) -> dict[str, Any]:
    """Top up the wallets of ``users`` (those the traffic pays from: ``loadgen.payers``)
    through the command API at ``url``, outside any measured run; what the funding did. Raises
    if a wallet was not funded: its payments would be 402."""
    funding = asyncio.run(
        loadgen.fund(url, wallets_key, users, amount=FUNDS, connections=connections)
    )
    if not funding.complete:
        raise RuntimeError(f"funding the payers' wallets failed: {funding.summary()}")
    return funding.summary()


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
    users: int = loadgen.USERS,
    profile: Path | None = None,
    e2e: EndToEnd | None = None,
) -> dict[str, Any]:
    """Warm up, then run the load generator against ``server``; the figures of the run. Its
    ``users`` payers must have been funded (``fund_payers``).

    With ``profile``, py-spy samples the server's processes during the measured seconds. With
    ``e2e``, probes time how long payments take to show on the query API meanwhile, and the
    read side's progress is sampled (``bench/lag.py``).
    """
    mix = loadgen.Mix(seed=seed, users=users)
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
                loadgen.Mix(seed=seed + 1, users=users),
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
        summary["end_to_end"] = _end_to_end(e2e, result, probes, applied, recorded, caught_up)
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


def _end_to_end(
    e2e: EndToEnd,
    result: loadgen.Result,
    probes: Probes,
    applied: int,
    recorded: int,
    caught_up: float | None,
) -> dict[str, Any]:
    """The read side's figures of a run: probe lags, applied/s, catching up, memory."""
    return {
        **probes.summary(),
        "applied_per_second": round(applied / result.elapsed, 1),
        "applied_vs_accepted_payments": round(applied / (result.payments + probes.sent), 3)
        if result.payments
        else None,
        "payments_in_write_store": recorded,
        "caught_up_seconds_after_load": None if caught_up is None else round(caught_up, 2),
        "memory": {name: p.memory() for name, p in e2e.pipeline.processes.items()},
    }
