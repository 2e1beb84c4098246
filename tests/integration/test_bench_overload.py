"""``bench.overload`` at a tiny size on the embedded default: capacity, then open loop past it
with shedding and without, and the figures the suite reports."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import overload as bench


def test_the_overload_bench_measures_shedding_against_a_baseline(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    bench.main(
        factor=3,
        seconds=1.5,
        connections=32,
        capacity_seconds=1,
        capacity_connections=16,
        warmup=0,
        timeout=5,
        workers=1,
        db_url="sqlite",
        seed=1,
        json_path=out,
    )
    report = orjson.loads(out.read_bytes())
    assert report["capacity"]["ok_per_second"] > 0
    for label in ("shedding", "baseline"):
        figures = report[label]
        assert figures["offered_per_second"] > report["capacity"]["ok_per_second"]
        assert figures["sent"] > 0
        assert figures["admitted"] > 0
        assert figures["admitted_latency_ms"]["p99"] >= figures["admitted_latency_ms"]["p50"]
        assert figures["payments_committed_unseen"] >= 0
    assert report["ratios"]["admitted_p99"] is not None
    assert not Path(report["directory"]).exists()  # SQLite files and logs removed
