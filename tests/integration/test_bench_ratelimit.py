"""``bench.ratelimit`` at a tiny size on the embedded default and the local Redis: the payers'
wallets funded, the API's capacity without the limit, then the same closed loop against a
per-key limit, and the figures the suite reports. Only what no machine speed can change is
asserted: the limit's upper bound, and that every refusal says when to retry."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import ratelimit as bench

LIMIT = 20


def test_the_rate_limit_bench_measures_a_limit_against_the_capacity(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    bench.main(
        limit=LIMIT,
        connections=16,
        seconds=2,
        warmup=0.5,
        workers=1,
        users=100,
        redis_url=bench.REDIS_URL,
        db_url="sqlite",
        json_path=out,
    )
    report = orjson.loads(out.read_bytes())
    limited, unlimited = report["limited"], report["unlimited"]
    # Every payer's wallet was funded first: each payment the limit let through was recorded.
    assert report["funding"]["funded"] == report["funding"]["users"] == 100
    assert unlimited["ok_per_second"] > 0
    assert set(unlimited["by_status"]) == {"201"}
    # The sliding window's documented bound over the run: limit x (seconds + 1).
    assert limited["passed"] <= LIMIT * (limited["elapsed_seconds"] + 1)
    if limited["limited"]:
        assert limited["limited_with_retry_after_and_remaining_0"] == 1.0
    assert set(limited["by_status"]) <= {"201", "429"}
    assert report["ratios"]["passed_per_second_vs_limit"] is not None
    assert not Path(report["directory"]).exists()  # SQLite files and logs removed
