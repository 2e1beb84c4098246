"""What ``kessai up``'s supervisor decides on its own, with real processes and sockets: restart
delays, how a death reads, which ports stop it from starting."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from kessai.broker import free_port
from kessai.processes import start_process
from kessai_cli.supervisor import (
    Backoff,
    Child,
    Port,
    describe_exit,
    is_taken,
    port_problems,
    supervise,
)


def test_restart_delays_double_from_half_a_second_up_to_ten() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_a_death_reads_as_its_exit_code_or_its_signal() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_a_listening_port_is_taken_and_a_free_one_is_not() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert is_taken("127.0.0.1", taken)
    assert not is_taken("127.0.0.1", free_port())


def test_each_taken_or_doubly_set_port_is_one_sentence_naming_what_to_change() -> None:
    free = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        problems = port_problems(
            [
                Port("127.0.0.1", free, "command API", "KESSAI_COMMAND_API_PORT"),
                Port("127.0.0.1", taken, "query API", "KESSAI_QUERY_API_PORT"),
                Port("127.0.0.1", free, "embedded broker", "KESSAI_EMBEDDED_BROKER_PORT"),
            ]
        )
    assert len(problems) == 2, problems
    busy, twice = problems
    assert f"port {taken} (query API) is already taken" in busy
    assert "KESSAI_QUERY_API_PORT" in busy
    assert f"ss -ltnp 'sport = :{taken}'" in busy
    assert f"port {free}" in twice
    assert "KESSAI_COMMAND_API_PORT" in twice
    assert "KESSAI_EMBEDDED_BROKER_PORT" in twice
    assert all("\n" not in p for p in problems)
    assert port_problems([Port("127.0.0.1", free_port(), "command API", "X")]) == []


class _Seen(Exception):
    """Enough events: ends ``supervise``, as a stop signal would."""


def _events_of(child: Child, backoff: Backoff, count: int) -> list[str]:
    events: list[str] = []

    def say(event: str) -> None:
        events.append(event)
        if len(events) == count:
            raise _Seen

    child.start()
    try:
        with pytest.raises(_Seen):
            supervise([child], say, backoff=backoff, poll_seconds=0.01)
    finally:
        if child.process is not None and child.process.poll() is None:
            child.process.kill()
            child.process.wait()
    return events


def _python(code: str, tmp_path: Path) -> Child:
    log_path = tmp_path / "child.log"
    return Child(
        "child",
        lambda: start_process([sys.executable, "-c", code], env=None, log_path=log_path),
        log_path,
    )


def test_a_child_that_keeps_dying_waits_longer_each_time(tmp_path: Path) -> None:
    child = _python("raise SystemExit(3)", tmp_path)
    events = _events_of(child, Backoff(first=0.05, cap=0.2, stable_after=60), count=8)
    deaths, restarts = events[0::2], events[1::2]
    assert all(e.startswith("child exited with code 3 after ") for e in deaths), deaths
    assert [e.split("restarting it in ")[1].split(" s")[0] for e in deaths] == [
        "0.05", "0.1", "0.2", "0.2",
    ]  # fmt: skip
    assert all(f"(log: {tmp_path / 'child.log'})" in e for e in deaths)
    assert all(e.startswith("child restarted (pid ") for e in restarts), restarts


def test_a_child_that_ran_long_enough_starts_over_at_the_first_delay(tmp_path: Path) -> None:
    child = _python("import time; time.sleep(0.3)", tmp_path)
    events = _events_of(child, Backoff(first=0.05, cap=0.2, stable_after=0.2), count=6)
    assert [e.split("restarting it in ")[1].split(" s")[0] for e in events[0::2]] == [
        "0.05", "0.05", "0.05",
    ]  # fmt: skip
    assert all(e.startswith("child exited with code 0 after 0.") for e in events[0::2])
