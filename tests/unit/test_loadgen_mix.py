"""The load generator's traffic shape and its latency figures."""

from __future__ import annotations

import itertools

import pytest

from kessai_cli import loadgen


def test_the_hot_merchant_takes_its_share_and_the_tail_is_zipf() -> None:
    cumulative = loadgen.merchant_weights(loadgen.Mix(merchants=100, hot_share=0.3))
    weights = [b - a for a, b in itertools.pairwise([0.0, *cumulative])]
    assert len(weights) == 100
    assert weights[0] == pytest.approx(0.3)
    assert cumulative[-1] == pytest.approx(1.0)
    assert weights[1] == pytest.approx(2 * weights[2])  # 1/rank
    assert all(a >= b for a, b in itertools.pairwise(weights[1:]))
    assert loadgen.merchant_weights(loadgen.Mix(merchants=1)) == [1.0]


def test_percentiles_are_nearest_rank() -> None:
    result = loadgen.Result(latencies=[i / 1000 for i in range(100, 0, -1)], elapsed=2.0)
    assert result.percentile(0.5) == pytest.approx(0.050)
    assert result.percentile(0.99) == pytest.approx(0.099)
    assert result.percentile(1.0) == pytest.approx(0.100)
    assert loadgen.Result().percentile(0.99) == 0.0
    assert result.summary()["latency_ms"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}


def test_a_run_needs_a_bound_and_an_http_url() -> None:
    with pytest.raises(ValueError, match="requests, a duration"):
        loadgen.run_sync(loadgen.Run(url="http://127.0.0.1:1", api_key="k"))
    with pytest.raises(ValueError, match="not an http"):
        loadgen.run_sync(loadgen.Run(url="ftp://x", api_key="k", requests=1))
