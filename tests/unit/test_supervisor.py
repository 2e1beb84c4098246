"""What ``kessai up``'s supervisor decides on its own: restart delays, how a death reads, which
ports stop it from starting (real sockets on 127.0.0.1)."""

from __future__ import annotations

import signal
import socket

from kessai.broker import free_port
from kessai.supervisor import Backoff, Port, describe_exit, is_taken, port_problems


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
