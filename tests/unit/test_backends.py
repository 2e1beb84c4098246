"""How tests/backends.py picks between testcontainers and local services."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from tests import backends


@pytest.fixture
def no_docker_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Point the Docker SDK at a socket nobody serves, whatever this machine runs."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def _engine(monkeypatch: pytest.MonkeyPatch, answers: bool) -> list[int]:
    calls: list[int] = []

    def fake() -> bool:
        calls.append(1)
        return answers

    monkeypatch.setattr(backends, "docker_available", fake)
    return calls


@pytest.mark.usefixtures("no_docker_engine")
def test_docker_available_is_false_without_an_engine() -> None:
    assert backends.docker_available() is False


def test_docker_available_gives_up_quickly_on_a_silent_engine(
    monkeypatch: pytest.MonkeyPatch, silent_listener: int
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{silent_listener}")
    started = time.monotonic()
    assert backends.docker_available() is False
    assert time.monotonic() - started < 3


@pytest.mark.usefixtures("no_docker_engine")
def test_containers_without_an_engine_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "containers")
    with pytest.raises(RuntimeError, match="Docker"):
        backends.selected_backend()


@pytest.mark.usefixtures("no_docker_engine")
def test_containers_without_an_engine_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "containers")
    with pytest.raises(RuntimeError, match="Docker"):
        backends.start_mysql()
    with pytest.raises(RuntimeError, match="Docker"):
        backends.start_kafka()


def test_containers_with_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "containers")
    _engine(monkeypatch, answers=True)
    assert backends.selected_backend() == "containers"


@pytest.mark.parametrize("answers", [True, False])
def test_local_ignores_docker(monkeypatch: pytest.MonkeyPatch, answers: bool) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "local")
    calls = _engine(monkeypatch, answers=answers)
    assert backends.selected_backend() == "local"
    assert calls == []


@pytest.mark.parametrize("value", [None, "", "auto", " AUTO "])
@pytest.mark.parametrize(("answers", "expected"), [(True, "containers"), (False, "local")])
def test_auto_follows_the_engine(
    monkeypatch: pytest.MonkeyPatch, value: str | None, answers: bool, expected: str
) -> None:
    if value is None:
        monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(backends.BACKEND_ENV, value)
    _engine(monkeypatch, answers=answers)
    assert backends.selected_backend() == expected


@pytest.mark.parametrize("value", ["docker", "testcontainers", "none", "local,containers"])
def test_invalid_backend_raises(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, value)
    _engine(monkeypatch, answers=True)
    with pytest.raises(ValueError, match=backends.BACKEND_ENV):
        backends.selected_backend()


def test_local_kafka_means_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "local")
    assert backends.start_kafka() is None


def _fake_pymysql(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace pymysql.connect; the returned dict collects its arguments and the close."""
    seen: dict[str, Any] = {}

    class FakeConnection:
        def close(self) -> None:
            seen["closed"] = True

    def fake_connect(**kwargs: Any) -> FakeConnection:
        seen.update(kwargs)
        return FakeConnection()

    monkeypatch.setattr(pymysql, "connect", fake_connect)
    return seen


def test_local_mysql_returns_a_server_level_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_pymysql(monkeypatch)
    monkeypatch.setenv(backends.BACKEND_ENV, "local")
    monkeypatch.setenv(backends.MYSQL_URL_ENV, "mysql+pymysql://kessai:p%40ss@db.example:3307/x")
    url, stop = backends.start_mysql()
    assert url == "mysql+pymysql://kessai:p%40ss@db.example:3307"
    assert seen["host"] == "db.example"
    assert seen["port"] == 3307
    assert seen["user"] == "kessai"
    assert seen["password"] == "p@ss"
    assert seen["closed"] is True
    stop()


def test_local_mysql_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "local")
    monkeypatch.delenv(backends.MYSQL_URL_ENV, raising=False)
    seen = _fake_pymysql(monkeypatch)
    url, _ = backends.start_mysql()
    assert url == backends.DEFAULT_LOCAL_MYSQL_URL
    assert (seen["host"], seen["port"], seen["user"], seen["password"]) == (
        "127.0.0.1",
        3306,
        "root",
        "",
    )


def test_local_mysql_that_does_not_answer_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv(backends.BACKEND_ENV, "local")
    monkeypatch.setenv(backends.MYSQL_URL_ENV, f"mysql+pymysql://root:@127.0.0.1:{closed_port}")
    with pytest.raises(RuntimeError, match="No MySQL server answers"):
        backends.start_mysql()
