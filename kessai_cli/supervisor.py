"""The child processes of ``kessai up``: restarted with backoff when they die on their own,
frozen while the embedded broker restarts, and the ports they need checked before anything
starts. They are started by ``kessai.processes.start_process``, so they die with ``kessai up``
(even of SIGKILL) and a stop reaches what they started.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from kessai.processes import signal_group


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``first`` s after a death, doubling after each further death up to
    ``cap``; a child that ran ``stable_after`` s before it died starts over at ``first``."""

    first: float = 0.5
    cap: float = 10.0
    stable_after: float = 30.0

    def delay(self, deaths_in_a_row: int) -> float:
        return float(min(self.first * 2 ** (deaths_in_a_row - 1), self.cap))


class Child:
    """One supervised process: how to start it, and its restart bookkeeping."""

    def __init__(
        self, name: str, start: Callable[[], subprocess.Popen[bytes]], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._start = start
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.deaths_in_a_row = 0
        self.restart_at: float | None = None
        """When a dead child is due to start again; ``None`` while it runs."""

    def start(self) -> None:
        self.process = self._start()
        self.started_at = time.monotonic()
        self.restart_at = None


class StartFailed(RuntimeError):
    """A child could not be started (it will be tried again after its backoff)."""


def supervise(
    children: Iterable[Child],
    say: Callable[[str], None],
    *,
    backoff: Backoff = Backoff(),
    poll_seconds: float = 0.2,
) -> NoReturn:
    """Restart every child that dies, with ``backoff``, and ``say`` each death and restart.
    Runs until a signal handler raises out of it; nothing is restarted after that.

    A polling loop rather than tenacity: tenacity retries one call in one place, while this
    keeps a separate schedule for each of several children in one thread (the same thread
    whose signal handler stops everything).
    """
    children = list(children)
    while True:
        now = time.monotonic()
        for child in children:
            process = child.process
            if child.restart_at is None:
                if process is None or process.poll() is None:
                    continue
                ran = now - child.started_at
                child.deaths_in_a_row = (
                    1 if ran >= backoff.stable_after else child.deaths_in_a_row + 1
                )
                delay = backoff.delay(child.deaths_in_a_row)
                child.restart_at = now + delay
                say(
                    f"{child.name} {describe_exit(process.returncode)} after {ran:.1f} s; "
                    f"restarting it in {delay:g} s (log: {child.log_path})"
                )
            elif now >= child.restart_at:
                try:
                    child.start()
                except (StartFailed, OSError) as exc:
                    child.deaths_in_a_row += 1
                    delay = backoff.delay(child.deaths_in_a_row)
                    child.restart_at = time.monotonic() + delay
                    say(
                        f"{child.name} could not be restarted ({exc}); trying again in "
                        f"{delay:g} s (log: {child.log_path})"
                    )
                    continue
                pid = child.process.pid if child.process else "?"
                say(f"{child.name} restarted (pid {pid})")
        time.sleep(poll_seconds)


@contextlib.contextmanager
def paused(processes: Iterable[subprocess.Popen[bytes] | None]) -> Iterator[None]:
    """Freeze running processes (SIGSTOP) for the duration of the block, then let them go on
    (SIGCONT). Where there is no SIGSTOP (Windows) nothing is paused."""
    if sys.platform == "win32":
        yield
        return
    frozen = [p for p in processes if p is not None and p.poll() is None]
    for process in frozen:
        signal_group(process, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in frozen:
            signal_group(process, signal.SIGCONT)


@dataclass(frozen=True)
class Port:
    """A port ``kessai up`` is about to listen on."""

    host: str
    port: int
    component: str
    setting: str


def port_problems(ports: Iterable[Port]) -> list[str]:
    """One sentence per port that is configured twice or already taken; empty when every
    port is free."""
    problems: list[str] = []
    seen: dict[int, Port] = {}
    for p in ports:
        if p.port in seen:
            problems.append(
                f"port {p.port} is set for both the {seen[p.port].component} "
                f"({seen[p.port].setting}) and the {p.component} ({p.setting}): "
                "give each its own"
            )
            continue
        seen[p.port] = p
        if is_taken(p.host, p.port):
            problems.append(
                f"port {p.port} ({p.component}) is already taken, maybe by an earlier kessai: "
                f"see what holds it with `ss -ltnp 'sport = :{p.port}'`, stop it, or set "
                f"{p.setting} to a free port"
            )
    return problems


def is_taken(host: str, port: int) -> bool:
    """Whether something listens on (or holds) ``host:port``, by trying to bind it the way a
    server does (SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not count)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # an unknown host is the server's error to report, not a taken port
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop everything cleanly."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``StopRequested`` wherever the main thread is, so a stop
    during start-up cleans up what was already started."""

    def on_signal(_signum: int, _frame: object) -> None:
        raise StopRequested

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_exit(children: dict[str, subprocess.Popen[bytes]]) -> str:
    """Block until a child exits (returns its name); a signal interrupts with StopRequested."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                return name
        time.sleep(0.2)
