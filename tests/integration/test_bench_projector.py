"""``bench.projector`` at a small size, end to end: the real broker and projector, on MariaDB
and on SQLite files."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson

from bench import projector as bench
from bench.reconciler import connect


def test_the_projector_bench_applies_everything_and_cleans_up(
    mysql_server: str, tmp_path: Path
) -> None:
    out = tmp_path / "figures.json"
    bench.main(events=2_000, db_url=mysql_server, json_path=out, timeout=120)
    report = orjson.loads(out.read_bytes())
    assert report["check"]["passed"], report["check"]
    assert report["check"]["rows_differing_from_baseline"] == {
        "payments": 0,
        "refunds": 0,
        "merchant_daily_totals": 0,
        "merchant_hourly_totals": 0,
    }
    projected = report["projector"]
    assert projected["applied"] == 2_000
    assert projected["duplicates"] == projected["parked"] == projected["dead_letters"] == 0
    assert sum(report["data"]["records_per_partition"]) == 2_000
    rates = {f["name"]: f["events_per_second"] for f in report["figures"]}
    assert rates["projector, from process start"] > 0
    assert rates["raw batched upserts (before)"] > 0
    assert rates["raw batched upserts (after)"] > 0
    assert projected["peak_rss_mib"] > 0
    with connect(mysql_server) as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES")
        left = {name for (name,) in cur.fetchall()} & set(report["databases"])
    assert not left, f"databases left behind: {left}"


def test_the_projector_bench_runs_on_sqlite_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        bench.main(
            events=2_000,
            db_url=f"sqlite:///{tmp_path / 'stores'}",
            json_path=out,
            batch_size=500,
            timeout=120,
            profile=None,
        )
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    report = orjson.loads(out.read_bytes())
    assert report["machine"]["database"].startswith("SQLite")
    # Every row of the projector's SQLite file equals the raw upserts' and the events' sums.
    assert report["check"]["passed"], report["check"]
    assert report["check"]["rows_differing_from_baseline"] == {
        "payments": 0,
        "refunds": 0,
        "merchant_daily_totals": 0,
        "merchant_hourly_totals": 0,
    }
    projected = report["projector"]
    assert projected["applied"] == 2_000
    assert projected["duplicates"] == projected["parked"] == projected["dead_letters"] == 0
    rates = {f["name"]: f for f in report["figures"]}
    assert rates["projector, first batch to last"]["ratio"] > 0
    for name in ("raw batched upserts (before)", "raw batched upserts (after)"):
        assert rates[name]["events_per_second"] > 0
        assert rates[name]["server_cpu_seconds"] is None  # no server: SQLite is in-process
    assert report["baseline_before"]["rows"]["payments"] > 0
    assert projected["peak_rss_mib"] > 0
    assert not Path(report["directory"]).exists()
    assert list((tmp_path / "stores").iterdir()) == []
