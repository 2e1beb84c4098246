"""``bench.writes`` at a tiny size on the embedded default: the real command API, relay,
broker, projector and query API, the payers' wallets funded before anything is measured, and
the figures the suite reports."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import writes as bench
from bench.lag import PROBE_PAYERS

USERS = 200


def test_the_writes_bench_measures_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    bench.main(
        connections=4,
        seconds=2,
        warmup=0.5,
        workers=1,
        db_url="sqlite",
        seed=1,
        users=USERS,
        json_path=out,
        profile=None,
        end_to_end=True,
    )
    report = orjson.loads(out.read_bytes())
    kessai = report["kessai"]
    # Every payer's wallet and every probe's was topped up once, before the runs: no balance
    # payment found its wallet short.
    funding = kessai["funding"]
    assert funding["funded"] == funding["users"] == USERS + len(PROBE_PAYERS)
    assert report["settings"]["mix"]["users"] == USERS
    assert kessai["insufficient_balance"] == 0
    assert kessai["ok_per_second"] > 0
    assert kessai["connection_errors"] == 0
    assert all(200 <= int(status) < 300 for status in kessai["by_status"]), kessai["by_status"]
    e2e = kessai["end_to_end"]
    # Every probe was answered and then seen on the query API; the lag is a real duration.
    assert e2e["probes"] > 10
    assert e2e["seen"] == e2e["probes"]
    assert e2e["refused"] == e2e["not_seen_within_timeout"] == 0
    assert 0 < e2e["lag_ms"]["p50"] <= e2e["lag_ms"]["p99"]
    # After the load the read side holds every payment the write store took.
    assert e2e["caught_up_seconds_after_load"] is not None
    assert e2e["payments_in_write_store"] >= kessai["payments"] + e2e["probes"]
    assert set(e2e["memory"]) == {"relay", "projector", "query-api"}
    assert report["bare_fastapi"]["ok_per_second"] > 0
    assert report["raw_inserts"]["inserts"] > 0
    assert report["ratios"]["kessai_vs_bare"] > 0
    assert not Path(report["directory"]).exists()  # SQLite files and logs removed
