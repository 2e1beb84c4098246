"""``bench.servers`` at a tiny size on the embedded default, uvicorn only (granian is not a
dependency of kessai), its payers' wallets funded first, and what it says when granian is asked
for but absent."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import typer

from bench import servers as bench


def test_the_servers_bench_measures_both_apps_under_uvicorn(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    bench.main(
        connections=2,
        seconds=1,
        warmup=0.2,
        rounds=1,
        workers=[1],
        servers=["uvicorn"],
        db_url="sqlite",
        seed=1,
        users=100,
        json_path=out,
    )
    report = orjson.loads(out.read_bytes())
    # The payers' wallets were funded once, before the first kessai run: no payment was 402.
    assert report["funding"]["funded"] == report["funding"]["users"] == 100
    assert [(r["app"], r["server"], r["workers"]) for r in report["runs"]] == [
        ("kessai", "uvicorn", 1),
        ("bare", "uvicorn", 1),
    ]
    for row in report["medians"]:
        assert row["ok_per_second"] > 0
        assert row["non_2xx"] == 0
        assert row["vs_uvicorn"]["ok_per_second"] == 1.0


def test_asking_for_granian_without_it_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "granian_missing", lambda: True)
    with pytest.raises(typer.Exit) as stopped:
        bench.main(workers=[1], servers=["uvicorn", "granian"], db_url="sqlite", json_path=None)
    assert stopped.value.exit_code == 2
    assert "granian is not installed" in capsys.readouterr().out
