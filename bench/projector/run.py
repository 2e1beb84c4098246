"""One run of the real projector (``kessai projector``, a subprocess), timed until its stored
offsets reach the end of the log."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.progress import Progress, TaskID

from bench.profiling import py_spy
from bench.reconciler import (
    process_cpu,
)
from bench.serving import memory_kib
from bench.stores import Stores

POLL_SECONDS = 0.02
"""How often the projector's stored offsets are read while it runs."""


# -- the projector -----------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One projector run: from its start, and from its first applied batch, to the end."""

    seconds: float = 0.0
    startup_seconds: float = 0.0
    """From the start of the process until its first batch was seen applied."""
    apply_seconds: float = 0.0
    applied_in_window: int = 0
    """Events applied between the first batch seen and the end."""
    cpu_seconds: float = 0.0
    apply_cpu_seconds: float = 0.0
    server_cpu_seconds: float | None = None
    apply_server_cpu_seconds: float | None = None
    peak_rss_mib: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def stored_position(cur: Any, topic: str, param: str = "%s") -> int:
    cur.execute(
        f"SELECT COALESCE(SUM(next_offset), 0) FROM projector_offsets WHERE topic = {param}",
        (topic,),
    )
    return int((cur.fetchone() or (0,))[0])


def scrape(port: int) -> dict[str, float]:
    """The projector's own counters (``KESSAI_PROJECTOR_METRICS_PORT``), labels summed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kessai_projector_") and "_bucket" not in sample.name:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def settled(port: int, total: int, timeout: float = 10.0) -> dict[str, float]:
    """The projector's counters once they count every event: it counts a batch after its
    transaction (offsets included) commits, so the stored offsets reach the end of the log
    just before the counters do."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(port)
        counted = sum(
            found.get(f"kessai_projector_{name}_total", 0.0)
            for name in ("events_applied", "duplicates", "parked", "dead_letters")
        )
        if counted >= total or time.monotonic() > deadline:
            return found
        time.sleep(POLL_SECONDS)


def sampling(pid: int, path: Path | None) -> contextlib.AbstractContextManager[None]:
    """py-spy attached to process ``pid`` while the block runs (all threads, idle included)."""
    return py_spy(pid, path, "--idle", "--threads", attach_seconds=0.0)


def run_projector(
    *,
    env: dict[str, str],
    stores: Stores,
    database: str,
    topic: str,
    total: int,
    metrics_port: int,
    mysqld: int | None,
    timeout: float,
    profile: Path | None,
    log: Path,
    progress: Progress,
) -> Run:
    """Start ``kessai projector``, wait until its stored offsets reach ``total``, stop it."""
    run = Run()
    task = progress.add_task("projector: starting", total=total)
    with stores.cursor(database) as (conn, cur):
        if stores.sqlite:
            conn.isolation_level = None  # autocommit: every poll sees the latest commit
        else:
            conn.autocommit(True)
        server_start = process_cpu(mysqld)
        with log.open("ab") as out:
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "kessai_cli", "projector"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            with sampling(process.pid, profile):
                poll = Poll(cur, stores.param, topic, total, process, mysqld, log, timeout)
                first, ended = poll.until_applied(started, progress, task)
                cpu = process_cpu(process.pid) or 0.0
                server_end = process_cpu(mysqld)
                peak = memory_kib(process.pid, "VmHWM")
                run.metrics = settled(metrics_port, total)
        finally:
            progress.remove_task(task)
            _stop(process)
    first_at, first_position, first_cpu, first_server = first
    run.seconds = ended - started
    run.startup_seconds = first_at - started
    run.apply_seconds = ended - first_at
    run.applied_in_window = total - first_position
    run.cpu_seconds = cpu
    run.apply_cpu_seconds = cpu - first_cpu
    if server_start is not None and server_end is not None:
        run.server_cpu_seconds = server_end - server_start
        if first_server is not None:
            run.apply_server_cpu_seconds = server_end - first_server
    run.peak_rss_mib = None if peak is None else round(peak / 1024, 1)
    return run


@dataclass(frozen=True, slots=True)
class Poll:
    """Reads the projector's stored offsets until they reach ``total``."""

    cur: Any
    param: str
    topic: str
    total: int
    process: subprocess.Popen[bytes]
    mysqld: int | None
    log: Path
    timeout: float

    def until_applied(
        self, started: float, progress: Progress, task: TaskID
    ) -> tuple[tuple[float, int, float, float | None], float]:
        """When the first batch was seen applied (time, position, projector CPU, server CPU),
        and when the last was; raises if the projector exits or runs out of time."""
        first: tuple[float, int, float, float | None] | None = None
        while True:
            position = stored_position(self.cur, self.topic, self.param)
            now = time.perf_counter()
            if position and first is None:
                first = (
                    now,
                    position,
                    process_cpu(self.process.pid) or 0.0,
                    process_cpu(self.mysqld),
                )
                progress.update(task, description="projector: applying")
            progress.update(task, completed=position)
            if position >= self.total:
                assert first is not None
                return first, now
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the projector exited with {self.process.returncode}: "
                    f"{self.log.read_text(errors='replace')[-3000:]}"
                )
            if now - started > self.timeout:
                raise RuntimeError(
                    f"the projector applied {position:,} of {self.total:,} events in "
                    f"{self.timeout:g} s"
                )
            time.sleep(POLL_SECONDS)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
