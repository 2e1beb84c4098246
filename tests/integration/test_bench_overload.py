"""``bench.overload`` at a tiny size on the embedded default: the payers' wallets funded,
capacity, then open loop past it with shedding and without, and the figures the suite
reports."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
import typer

from bench import overload as bench

USERS = 100
"""Payers of the traffic: few, so funding their wallets is quick."""


def test_the_overload_bench_measures_shedding_against_a_baseline(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    cpus = sorted(os.sched_getaffinity(0))
    # Server and client pinned apart where there are two CPUs: the fair measurement's path.
    pin = f"{cpus[0]}:{cpus[1]}" if len(cpus) >= 2 else None
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
        pin=pin,
        users=USERS,
        json_path=out,
    )
    assert sorted(os.sched_getaffinity(0)) == cpus  # the client's pinning is undone
    report = orjson.loads(out.read_bytes())
    # Funded before the first warm-up: no payment of any run found its wallet short.
    assert report["funding"]["funded"] == report["funding"]["users"] == USERS
    assert "402" not in report["capacity"]["by_status"]
    assert report["capacity"]["ok_per_second"] > 0
    for label in ("shedding", "baseline"):
        figures = report[label]
        assert figures["offered_per_second"] > report["capacity"]["ok_per_second"]
        assert figures["sent"] > 0
        assert figures["admitted"] > 0
        assert figures["admitted_latency_ms"]["p99"] >= figures["admitted_latency_ms"]["p50"]
        assert figures["payments_committed_unseen"] >= 0
        assert "402" not in figures["by_status"]
    assert report["ratios"]["admitted_p99"] is not None
    assert report["settings"]["pin"] == pin
    assert not Path(report["directory"]).exists()  # SQLite files and logs removed


def test_pin_takes_a_server_and_a_client_cpu_list() -> None:
    assert bench.pinning(None) == (None, None)
    assert bench.pinning("0:1") == ("0", {1})
    assert bench.pinning("0-1:2,4-5") == ("0-1", {2, 4, 5})
    for wrong in ("0", "0:", ":1", "0:x"):
        with pytest.raises(typer.BadParameter):
            bench.pinning(wrong)


def test_behind_nginx_driven_by_wrk_every_refusal_is_a_503_with_retry_after(
    tmp_path: Path,
) -> None:
    """The production proxy (deploy/nginx/, run by nginx itself) in front of the API, and wrk's
    open loop (bench/overload.lua): a bound of one request in flight refuses most of a flood,
    each refusal the proxy's 503 with Retry-After, and the admitted payments are timed from
    when they were due (the order_ref echo)."""
    out = tmp_path / "figures.json"
    bench.main(
        factor=4,
        seconds=1.5,
        connections=32,
        capacity_seconds=1,
        capacity_connections=16,
        warmup=0,
        timeout=2,
        workers=1,
        db_url="sqlite",
        seed=1,
        pin=None,
        proxy=True,
        proxy_max_in_flight=1,
        proxy_refund_in_flight=1,
        client=bench.Client.wrk,
        users=USERS,
        json_path=out,
    )
    report = orjson.loads(out.read_bytes())
    assert report["settings"]["client"] == "wrk"
    assert report["funding"]["funded"] == USERS
    proxied = report["proxied"]
    assert proxied["client"] == "wrk"
    assert proxied["sent"] > 0
    assert proxied["admitted"] > 0
    assert proxied["refused"] > 0
    assert set(proxied["by_status"]) <= {"201", "503"}
    assert proxied["refusals_with_retry_after"] == 1.0
    latency = proxied["admitted_latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"]
    # From when a request was due is never less than from when it was sent.
    assert latency["p99"] >= proxied["admitted_latency_from_sent_ms"]["p99"]
    assert proxied["payments_committed_unseen"] >= 0
    for label in ("shedding", "baseline"):
        assert report[label]["client"] == "wrk"
        assert report[label]["admitted"] > 0
