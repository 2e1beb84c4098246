"""py-spy attached to a process while a block of a benchmark runs (``--profile FILE``).

The format follows the file's suffix: ``.svg`` flame graph, ``.json`` speedscope, anything
else collapsed stacks (one line per stack, the form to grep and sum). py-spy is not a
dependency: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def py_spy(
    pid: int, path: Path | None, *options: str, attach_seconds: float = 1.0
) -> Iterator[None]:
    """Sample ``pid`` at 100 Hz with py-spy's extra ``options`` (``--subprocesses``, ``--idle``,
    ``--threads``) from ``attach_seconds`` before the block until its end; nothing when
    ``path`` is ``None``."""
    if path is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    command = [exe, "record", "--pid", str(pid), "--output", str(path), "--format", fmt]
    spy = subprocess.Popen([*command, "--rate", "100", *options], stdout=subprocess.DEVNULL)
    time.sleep(attach_seconds)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=120)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
