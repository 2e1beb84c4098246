"""``bench.reconciler`` at a tiny size on the embedded default: SQLite files, the real
reconciler, its two checks (a consistent state reports nothing, a drift is found exactly)."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson

from bench import reconciler as bench


def test_the_reconciler_bench_runs_on_sqlite_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        bench.main(
            events=3_000,
            db_url=f"sqlite:///{tmp_path / 'stores'}",
            json_path=out,
            chunk_size=None,
            drift=50,
            profile=None,
            keep=False,
            reuse=None,
        )
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    report = orjson.loads(out.read_bytes())
    assert report["machine"]["database"].startswith("SQLite")
    assert report["data"]["events"] == 3_000
    assert report["data"]["refunds"] > 0
    figures = {f["name"]: f for f in report["figures"]}
    assert set(figures) == {
        "baseline (before)",
        "incremental",
        "full audit",
        "baseline (after)",
        "read + orjson.loads",
        "read + parse_event",
        "incremental, drift, --dry-run",
    }
    # The consistent state is reported consistent over every payment; the drift exactly.
    for name in ("incremental", "full audit"):
        assert figures[name]["findings"] == {}, figures[name]
        assert figures[name]["payments_checked"] == report["data"]["payments"]
    drift = figures["incremental, drift, --dry-run"]["findings"]
    assert drift["missing"] == 50
    assert set(drift) <= {"missing", "totals_unverified"}, drift  # right totals never "wrong"
    for f in report["figures"]:
        assert f["seconds"] > 0, f
        assert f["events_per_second"] > 0, f
        assert f["ratio"] > 0, f
    # The SQLite files went with their temporary directory; nothing else was left there.
    assert not Path(report["directory"]).exists()
    assert list((tmp_path / "stores").iterdir()) == []
