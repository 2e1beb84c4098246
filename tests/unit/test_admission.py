"""The admission decision: a stable share of devices per window, constant within it."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from command_service.admission import admitted, window_end

DEVICES = [f"device-{i}" for i in range(20_000)]


@settings(max_examples=30, deadline=None)
@given(
    percent=st.floats(min_value=1, max_value=99),
    window_seconds=st.integers(min_value=10, max_value=3_600),
    now=st.floats(min_value=1.7e9, max_value=2.0e9),
)
def test_the_admitted_share_converges_on_the_percentage(
    percent: float, window_seconds: int, now: float
) -> None:
    share = sum(admitted(d, percent, window_seconds, now) for d in DEVICES) / len(DEVICES)
    # 20,000 devices: the binomial standard deviation is at most 0.35 percentage points.
    assert abs(share * 100 - percent) < 1.5


@settings(max_examples=200, deadline=None)
@given(
    device=st.text(min_size=1, max_size=128),
    percent=st.floats(min_value=0, max_value=100),
    window_seconds=st.integers(min_value=10, max_value=86_400),
    now=st.floats(min_value=1.7e9, max_value=2.0e9),
    offsets=st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=10),
)
def test_a_devices_answer_is_constant_within_its_window(
    device: str, percent: float, window_seconds: int, now: float, offsets: list[float]
) -> None:
    start = window_end(window_seconds, now) - window_seconds
    first = admitted(device, percent, window_seconds, start)
    for fraction in offsets:
        moment = min(start + fraction * window_seconds, window_end(window_seconds, now) - 1e-3)
        assert admitted(device, percent, window_seconds, moment) == first


def test_the_admitted_group_rotates_each_window() -> None:
    window, now = 300, 1_800_000_000.0
    this = {d for d in DEVICES if admitted(d, 30, window, now)}
    following = {d for d in DEVICES if admitted(d, 30, window, now + window)}
    # Independent groups of 30% overlap on about 9% of devices, not on 30%.
    overlap = len(this & following) / len(DEVICES)
    assert 0.07 < overlap < 0.11
    # Nobody is refused for ever: over ten windows almost every device gets in at least once.
    ever = set().union(*({d for d in DEVICES if admitted(d, 30, window, now + k * window)}
                         for k in range(10)))  # fmt: skip
    assert len(ever) / len(DEVICES) > 0.95


def test_every_process_decides_alike() -> None:
    """Not Python's salted hash(): another interpreter with another hash seed agrees."""
    devices = DEVICES[:500]
    here = [admitted(d, 50, 60, 1_800_000_000.0) for d in devices]
    code = (
        "from command_service.admission import admitted;"
        f"print(''.join('1' if admitted(f'device-{{i}}', 50, 60, 1_800_000_000.0) else '0' "
        f"for i in range({len(devices)})))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == "".join("1" if a else "0" for a in here)
