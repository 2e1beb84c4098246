"""The bench's servers: an API (or a service) in a subprocess, its processes, memory and CPU.

Shared by the benchmarks that serve the real APIs (``bench.writes``, ``bench.servers``,
``bench.overload``, ``bench.queries``, ``bench/lag.py``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from bench.reconciler import process_cpu

ROOT = Path(__file__).resolve().parents[1]
UNLIMITED = "1000000/second"
WALLET_LIMIT = 10**12
"""``KESSAI_WALLET_MAX_BALANCE`` of the served APIs (the most it may be): the benches fund every
payer with more than any run spends (``bench.drive.FUNDS``), so no payment is 402. The limit
is checked all the same."""


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


def served_env(home: Path, write_url: str, keys_url: str, read_url: str) -> dict[str, str]:
    """The environment of the served APIs: this process's, without its KESSAI_* settings but
    the group-commit ones, over the bench's databases, rate limits and the wallets' balance
    limit out of the way."""
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
            "KESSAI_WALLET_MAX_BALANCE": str(WALLET_LIMIT),
            "KESSAI_LOG_LEVEL": "WARNING",
        }
    )
    for setting in ("GROUP_COMMIT", "GROUP_COMMIT_MAX_BATCH", "GROUP_COMMIT_MAX_DELAY_MS"):
        if f"KESSAI_{setting}" in os.environ:
            env[f"KESSAI_{setting}"] = os.environ[f"KESSAI_{setting}"]
    return env


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the bench's cleanup (dropping its databases) runs either way."""
    raise KeyboardInterrupt
