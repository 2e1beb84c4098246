"""``bench.projector`` at a small size, end to end: the real broker, projector and MariaDB."""

from __future__ import annotations

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
