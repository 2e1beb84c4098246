"""Child processes that die with their parent: started in a process group of their own and,
on Linux, with a parent-death signal, so that when the parent dies, even of SIGKILL, the kernel
SIGKILLs each child and no orphan keeps a port or a consumer group. SIGKILL rather than SIGTERM
because nobody is left to enforce a stop deadline, and every component is built to be killed
at any point (the outbox, the projector's offsets and the reconciler are the recovery).

Used by the embedded broker here and by ``kessai up`` (``kessai_cli.supervisor``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); ``None`` elsewhere, where it is not available.

    The kernel sends it when the *thread* that forked the child exits, so it is only asked
    for from the main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        # Between fork and prctl the parent may have died already: then nobody would send the
        # signal, so the child goes at once.
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


def start_process(
    argv: list[str], *, env: dict[str, str] | None, log_path: Path | None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, dying with this process, its output appended
    to ``log_path`` (or discarded)."""
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
    try:
        return subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL if log is None else log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    finally:
        if log is not None:
            log.close()  # the child writes through its own copy of the descriptor


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the child's process group (itself and whatever it started)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
