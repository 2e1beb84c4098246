"""The relay's, projector's and reconciler's metrics listen where ``KESSAI_METRICS_HOST`` says.

In a container, 127.0.0.1 is the container's own loopback: a Prometheus in another container
could not scrape a server bound there, which is what compose's 9102 did.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from kessai.broker import free_port
from kessai.observability import serve_metrics
from kessai.settings import Settings


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_metrics_listen_on_loopback_by_default() -> None:
    assert Settings().metrics_host == "127.0.0.1"


@pytest.mark.parametrize(("bound", "elsewhere"), [("127.0.0.2", "127.0.0.1")])
def test_metrics_listen_on_the_configured_host_only(bound: str, elsewhere: str) -> None:
    registry = CollectorRegistry()
    Counter("kessai_test_total", "A counter to find.", registry=registry).inc()
    port = free_port()
    settings = Settings(metrics_host=bound)

    serve_metrics(settings, port, registry)

    with urllib.request.urlopen(f"http://{bound}:{port}/metrics", timeout=2) as answer:
        assert b"kessai_test_total 1.0" in answer.read()
    assert not reachable(elsewhere, port)


def test_compose_serves_metrics_beyond_the_container() -> None:
    from tests.unit.test_compose import load_compose

    env = load_compose()["x-kessai-env"]
    assert env["KESSAI_METRICS_HOST"] == "0.0.0.0"
