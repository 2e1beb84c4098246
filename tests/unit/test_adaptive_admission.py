"""Adaptive admission: the admitted share falls while queue delay stays above its target,
rises again as it clears, stays within [floor, configured percent], and never evicts a device
already admitted in the current window. A fake clock drives it."""

from __future__ import annotations

import itertools

from command_service.admission import AdaptiveShare, AdmittedDevices, admitted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def controller(clock: FakeClock, **overrides: float) -> AdaptiveShare:
    values = {"target_delay": 0.005, "floor": 10.0, "interval": 1.0} | overrides
    return AdaptiveShare(clock=clock, **values)


def run(share: AdaptiveShare, clock: FakeClock, seconds: float, delays: list[float]) -> None:
    """``delays`` observed again and again, ten per 100 ms, for ``seconds``."""
    end = clock.now + seconds
    while clock.now < end:
        for delay in delays:
            share.observe(delay)
        clock.now += 0.1


def test_the_share_falls_while_delay_stays_above_target_and_never_below_the_floor() -> None:
    clock = FakeClock()
    share = controller(clock)
    assert share.percent(100) == 100
    seen = []
    for _ in range(20):
        run(share, clock, 1.0, [0.02, 0.03])
        seen.append(share.percent(100))
    assert seen[0] < 100
    assert all(later <= earlier for earlier, later in itertools.pairwise(seen))
    assert seen[-1] == 10.0  # the floor, reached and held
    assert min(seen) >= 10.0


def test_the_share_rises_again_as_the_delay_clears_up_to_the_configured_percent() -> None:
    clock = FakeClock()
    share = controller(clock)
    run(share, clock, 5.0, [0.05])
    low = share.percent(80)
    assert low < 50
    seen = []
    for _ in range(30):
        run(share, clock, 1.0, [0.0, 0.001])
        seen.append(share.percent(80))
    assert seen[0] > low
    assert all(later >= earlier for earlier, later in itertools.pairwise(seen))
    assert seen[-1] == 80  # back to what the operator configured, never above it
    assert max(seen) <= 80


def test_an_idle_process_recovers_without_traffic() -> None:
    clock = FakeClock()
    share = controller(clock)
    run(share, clock, 4.0, [0.05])
    low = share.percent(100)
    clock.now += 60  # nothing observed for a minute: the queue is clear
    assert share.percent(100) == 100 > low


def test_a_queue_that_empties_within_each_interval_lowers_nothing() -> None:
    """Bursts that drain are a good queue: only an interval in which most requests waited
    longer than the target counts."""
    clock = FakeClock()
    share = controller(clock)
    run(share, clock, 10.0, [0.2, 0.0, 0.001])
    assert share.percent(100) == 100


def test_the_floor_never_lifts_the_share_above_the_configured_percent() -> None:
    clock = FakeClock()
    share = controller(clock, floor=20.0)
    run(share, clock, 20.0, [0.05])
    assert share.percent(100) == 20.0
    assert share.percent(5) == 5  # an operator's 5% wins over the floor


def test_a_device_admitted_in_this_window_stays_admitted_when_the_share_falls() -> None:
    window, now = 600, 1_800_000_000.0
    devices = [f"phone-{i}" for i in range(400)]
    inside_at_80 = [d for d in devices if admitted(d, 80, window, now)]
    outside_at_30 = [d for d in inside_at_80 if not admitted(d, 30, window, now)]
    assert outside_at_30  # devices the lower share alone would evict
    remembered = AdmittedDevices(size=1_000)
    for device in inside_at_80:
        assert remembered.decide(device, percent=80, ceiling=80, window_seconds=window, now=now)
    # The share falls to 30% mid-window: the devices admitted at 80% keep their window...
    later = now + 60
    for device in outside_at_30:
        assert remembered.decide(device, percent=30, ceiling=80, window_seconds=window, now=later)
    # ... while new devices get only the 30%.
    newcomers = [f"tablet-{i}" for i in range(400)]
    share_new = sum(
        remembered.decide(d, percent=30, ceiling=80, window_seconds=window, now=later)
        for d in newcomers
    ) / len(newcomers)
    assert 0.2 < share_new < 0.4
    # The next window starts afresh: the 30% alone decides.
    next_window = (int(now // window) + 1) * window + 1.0
    for device in outside_at_30:
        expected = admitted(device, 30, window, next_window)
        got = remembered.decide(device, 30, ceiling=80, window_seconds=window, now=next_window)
        assert got == expected
    # An operator lowering the configured percent is obeyed at once.
    lowered = [d for d in inside_at_80 if not admitted(d, 10, window, later)]
    assert not any(
        remembered.decide(d, percent=10, ceiling=10, window_seconds=window, now=later)
        for d in lowered
    )
