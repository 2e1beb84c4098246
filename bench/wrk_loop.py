"""The open loop of ``bench.overload`` driven by wrk instead of Python (``--client wrk``).

At ten times one core's capacity the Python client must send 9,000-14,000 requests/s from one
core, which is its own limit (docs/BENCHMARKS.md, "Overload"): its lag then shows in every
latency, refusals included. wrk (C, Debian's ``wrk`` package, with LuaJIT) sends the same
payments open loop for a fraction of the CPU; ``bench/overload.lua`` makes it an open loop and
times the admitted answers from when each request was due. The figures have the keys of
``bench.openloop.open_loop``'s, except that refusals are counted but not timed (their latency
is None; wrk's own histogram of every answer, from when each was sent, is given beside).
"""

from __future__ import annotations

import math
import resource
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.openloop import percentile_ms
from kessai_cli import loadgen

SCRIPT = Path(__file__).with_name("overload.lua")
MARK = "kessai-overload "
THREADS = 2


class WrkMissing(RuntimeError):
    """No wrk binary to run."""


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing("wrk is not installed (not on PATH): apt-get install wrk")
    return found


def wrk_open_loop(
    url: str,
    key: str,
    rate: float,
    seconds: float,
    connections: int,
    timeout: float,
    *,
    users: int = loadgen.USERS,
) -> tuple[dict[str, Any], int]:
    """One open-loop run by wrk (on this process's CPUs): balance payments by the load
    generator's ``users`` payers (``loadgen.payers``: fund them first); its figures and the
    payments the client saw created. wrk runs ``timeout`` seconds past the schedule's end, so
    a request sent last gets the same time to answer as any other."""
    prefix = f"wrk-{uuid.uuid4().hex[:12]}"
    threads = min(THREADS, connections)
    argv = [
        wrk_binary(), "-t", str(threads), "-c", str(connections),
        "-d", f"{math.ceil(seconds + timeout) + 1}s", "--timeout", f"{timeout:g}s",
        "-s", str(SCRIPT), url, "--",
        key, f"{rate:g}", f"{seconds:g}", f"{timeout:g}", prefix, str(threads), str(users),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    line = next((x for x in done.stdout.splitlines() if x.startswith(MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr + done.stdout)[-2000:]}")
    out = orjson.loads(line[len(MARK) :])
    figures, seen = figures_of(out, rate, seconds, timeout)
    figures["client_cpu_seconds"] = round(cpu, 2)
    return figures, seen


def figures_of(
    out: dict[str, Any], rate: float, seconds: float, timeout: float
) -> tuple[dict[str, Any], int]:
    """What ``overload.lua`` printed, as ``bench.openloop``'s figures."""
    admitted: list[float] = out["admitted"]
    by_status = {int(k): v for k, v in out["by_status"].items()}
    sent, answered, refused = out["sent"], out["answered"], out["refused"]
    unanswered = max(0, sent - answered)
    never_sent = max(0, out["scheduled"] - sent)
    timeouts = unanswered + never_sent + out["late"]
    ok = sum(v for k, v in by_status.items() if 200 <= k < 300)
    other = sum(v for k, v in by_status.items() if 400 <= k < 500 and k != 429)
    return (
        {
            "client": "wrk",
            "offered_per_second": round(rate, 1),
            "sent": sent,
            "sent_per_second": round(sent / seconds, 1),
            "elapsed_seconds": round(out["duration_us"] / 1e6, 2),
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "refusal_codes": {},
            "admitted": ok,
            "admitted_per_second": round(ok / seconds, 1),
            "admitted_latency_ms": {
                "p50": percentile_ms(admitted, 0.5),
                "p99": percentile_ms(admitted, 0.99),
            },
            "admitted_latency_from_sent_ms": {
                "p50": percentile_ms(out["admitted_from_sent"], 0.5),
                "p99": percentile_ms(out["admitted_from_sent"], 0.99),
            },
            "refused": refused,
            "other_4xx": other,
            "refused_latency_ms": {"p50": None, "p99": None},
            "answer_latency_from_sent_ms": {
                "p50": round(out["sent_latency_p50_us"] / 1000, 1),
                "p99": round(out["sent_latency_p99_us"] / 1000, 1),
            },
            "refusals_with_retry_after": round(out["with_retry_after"] / refused, 4)
            if refused
            else None,
            "client_timeouts": timeouts,
            "timeouts_detail": {
                "no_answer": unanswered,
                "never_sent": never_sent,
                "answered_too_late": out["late"],
                "socket_timeouts": out["socket_timeouts"],
            },
            "client_cpu_seconds": None,
        },
        ok - sum(1 for s in admitted if s > timeout),
    )
