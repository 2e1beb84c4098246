"""What bench/overload.lua prints, read as the open loop's figures (bench/wrk_loop.py)."""

from __future__ import annotations

from bench.wrk_loop import figures_of


def printed(**changes: object) -> dict[str, object]:
    out: dict[str, object] = {
        "scheduled": 1_000,
        "sent": 990,
        "answered": 985,
        "late": 2,
        "refused": 900,
        "with_retry_after": 900,
        "by_status": {"201": 80, "503": 900, "409": 5},
        "socket_timeouts": 0,
        "connect_errors": 0,
        "read_errors": 0,
        "write_errors": 0,
        "duration_us": 13_000_000,
        "sent_latency_p50_us": 1_500,
        "sent_latency_p99_us": 40_000,
        "admitted": [0.010] * 70 + [0.050] * 8 + [12.0, 13.0],
        "admitted_from_sent": [0.009] * 78 + [0.5, 0.6],
    }
    out.update(changes)
    return out


def test_time_outs_are_the_unsent_the_unanswered_and_the_late() -> None:
    figures, seen = figures_of(printed(), rate=100.0, seconds=10.0, timeout=10.0)
    assert figures["timeouts_detail"] == {
        "no_answer": 5,
        "never_sent": 10,
        "answered_too_late": 2,
        "socket_timeouts": 0,
    }
    assert figures["client_timeouts"] == 17
    # 80 payments created, two of them answered after the client's time-out: 78 seen.
    assert figures["admitted"] == 80
    assert seen == 78
    assert figures["other_4xx"] == 5
    assert figures["sent_per_second"] == 99.0
    assert figures["admitted_per_second"] == 8.0


def test_latencies_are_percentiles_in_ms_and_refusals_are_counted_not_timed() -> None:
    figures, _ = figures_of(printed(), rate=100.0, seconds=10.0, timeout=10.0)
    assert figures["admitted_latency_ms"] == {"p50": 10.0, "p99": 12_000.0}
    assert figures["admitted_latency_from_sent_ms"]["p50"] == 9.0
    assert figures["refused_latency_ms"] == {"p50": None, "p99": None}
    assert figures["answer_latency_from_sent_ms"] == {"p50": 1.5, "p99": 40.0}
    assert figures["refusals_with_retry_after"] == 1.0


def test_no_refusal_leaves_the_retry_after_share_undefined() -> None:
    figures, _ = figures_of(
        printed(refused=0, with_retry_after=0, by_status={"201": 80}),
        rate=100.0,
        seconds=10.0,
        timeout=10.0,
    )
    assert figures["refusals_with_retry_after"] is None
