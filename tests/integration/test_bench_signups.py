"""``bench.signups`` at a tiny size on the embedded default: the real command API, relay,
broker and rewards service; a burst of registrations while payments flow; and the figures it
reports, read back from its JSON. Nothing here is timed."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import signups as bench

REGISTRATIONS = 60


def test_the_signups_bench_grants_every_user_of_the_storm_once(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    bench.main(
        registrations=REGISTRATIONS,
        rate=20,
        seconds=1,
        connections=4,
        storm_rate=None,
        payment_connections=2,
        warmup=0.5,
        workers=1,
        users=50,
        db_url="sqlite",
        seed=1,
        quick=False,
        json_path=out,
    )
    report = orjson.loads(out.read_bytes())
    storm = report["storm"]
    assert storm["registered"] == REGISTRATIONS
    assert storm["by_status"] == {"201": REGISTRATIONS}
    assert storm["registrations_per_second"] > 0
    # Every user of the storm holds one grant of exactly 500 yen, read from the write store.
    welcome = report["welcome"]
    assert welcome["users"] == welcome["granted_exactly_500"] == REGISTRATIONS
    assert welcome["every_user_exactly_500"] is True
    assert 0 < welcome["grant_lag_ms"]["p50"] <= welcome["grant_lag_ms"]["p99"]
    assert report["caught_up"]["welcome_seconds"] is not None
    assert report["caught_up"]["cashback_seconds"] is not None
    for window in ("baseline", "storm_payments", "rate_with_rewards", "rate_without_rewards"):
        figures = report[window]
        assert figures["payments"] > 0, window
        assert figures["connection_errors"] == 0, window
        assert all(200 <= int(s) < 300 for s in figures["by_status"]), (window, figures)
    ratios = report["ratios"]
    assert ratios["storm_p99_vs_baseline"] > 0
    assert ratios["rate_with_rewards_vs_without"] > 0
    assert not Path(report["directory"]).exists()  # SQLite files and logs removed
