"""``CounterStoreHealth``: when the rate limiter stops calling a failing Redis, how it tries
again, and how often it says so in the log."""

from __future__ import annotations

import logging

import pytest

from kessai.ratelimit import CounterStoreHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_skip_the_store_then_one_probe_at_a_time() -> None:
    clock = Clock()
    health = CounterStoreHealth(failures_to_skip=3, skip_seconds=2.0, clock=clock)
    for _ in range(2):
        assert health.may_call()
        health.failed(ConnectionError("refused"))
    health.succeeded()  # an answer between failures: they are not in a row
    for _ in range(3):
        assert health.may_call()
        health.failed(ConnectionError("refused"))
    assert not health.may_call()
    assert health.retry_after() == 2
    clock.now += 2.0
    assert health.may_call()  # the probe
    assert not health.may_call()  # the others wait for its answer
    health.failed(ConnectionError("refused"))
    assert not health.may_call()
    clock.now += 2.0
    assert health.may_call()
    health.succeeded()
    assert all(health.may_call() for _ in range(5))


def test_a_cancelled_probe_lets_the_next_check_probe() -> None:
    clock = Clock()
    health = CounterStoreHealth(failures_to_skip=1, skip_seconds=1.0, clock=clock)
    health.failed(TimeoutError())
    clock.now += 1.0
    assert health.may_call()
    health.abandoned()
    assert health.may_call()


def test_unanswered_checks_are_logged_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    health = CounterStoreHealth(log_interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="kessai.ratelimit")
    health.failed(ConnectionError("Error 111 connecting"))
    for _ in range(500):
        health.unanswered("allow")
        clock.now += 0.01  # 5 s in all
    clock.now = 1010.0  # the interval since the first line is over
    health.unanswered("refuse")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("rate-limit counters unavailable: 1 check(s)")
    assert "let through" in messages[0]
    assert "Error 111 connecting" in messages[0]
    assert messages[1].startswith("rate-limit counters unavailable: 500 check(s)")
    assert "refused (503)" in messages[1]
    assert all(r.exc_info is None for r in caplog.records)
