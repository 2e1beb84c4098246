"""Where the integration tests get MySQL and Kafka.

The environment variable ``KESSAI_TEST_BACKEND`` picks one of three modes:

``containers``
    Throwaway MySQL 8.4 and Kafka (KRaft) containers through testcontainers. A Docker engine
    must answer; if none does, :func:`selected_backend` raises ``RuntimeError``. It never falls
    back or skips silently, so a CI job that asks for containers really tests against them.
``local``
    Services already running on this machine: the MySQL (or MariaDB) server at
    ``KESSAI_TEST_MYSQL_URL`` (default ``mysql+pymysql://root:@127.0.0.1:3306``) and, for
    Kafka, the embedded Tansu broker that the test suite starts itself.
``auto`` (or unset)
    ``containers`` when a Docker engine answers, ``local`` otherwise.

Plain functions only; fixtures wrap them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import Any

import pymysql
import sqlalchemy as sa

BACKEND_ENV = "KESSAI_TEST_BACKEND"
MYSQL_URL_ENV = "KESSAI_TEST_MYSQL_URL"
DEFAULT_LOCAL_MYSQL_URL = "mysql+pymysql://root:@127.0.0.1:3306"
BACKENDS = ("auto", "containers", "local")

MYSQL_IMAGE = "mysql:8.4"
# The testcontainers Kafka module drives the Confluent image's start scripts; 7.6.0 is the
# version it is released against (Apache Kafka 3.6, KRaft capable).
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
KAFKA_START_TIMEOUT_S = 120

Stop = Callable[[], None]


def docker_available() -> bool:
    """True only if a Docker engine answers a ping (within about a second)."""
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        client = docker.from_env(timeout=1)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def selected_backend() -> str:
    """``"containers"`` or ``"local"``, according to ``KESSAI_TEST_BACKEND``."""
    requested = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if requested not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={requested!r} is not one of {', '.join(BACKENDS)}",
        )
    if requested == "local":
        return "local"
    if requested == "containers":
        if not docker_available():
            raise RuntimeError(
                f"{BACKEND_ENV}=containers, but no Docker engine answers "
                f"(DOCKER_HOST={os.environ.get('DOCKER_HOST', '<unset>')}). Start Docker, "
                f"or set {BACKEND_ENV}=local to use local MySQL and the embedded broker.",
            )
        return "containers"
    return "containers" if docker_available() else "local"


def start_mysql() -> tuple[str, Stop]:
    """A server-level SQLAlchemy URL (no database) with root rights, and its stop callback."""
    if selected_backend() == "containers":
        return _start_mysql_container()
    return _local_mysql()


def start_kafka() -> tuple[str, Stop] | None:
    """Bootstrap servers of a Kafka container and its stop callback.

    ``None`` in local mode: the caller then uses the embedded broker.
    """
    if selected_backend() == "containers":
        return _start_kafka_container()
    return None


def _start_mysql_container() -> tuple[str, Stop]:
    try:
        from testcontainers.community.mysql import MySqlContainer
    except ImportError:  # releases before the "community" namespace
        from testcontainers.mysql import MySqlContainer

    password = "kessai-test"
    container: Any = MySqlContainer(
        MYSQL_IMAGE, dialect="pymysql", username="root", password=password
    )
    # Migrations create triggers; binary logging is on by default in MySQL 8.
    container.with_command("--log-bin-trust-function-creators=1")
    try:
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(3306)
    except BaseException:
        _remove_quietly(container)
        raise
    return f"mysql+pymysql://root:{password}@{host}:{port}", container.stop


def _local_mysql() -> tuple[str, Stop]:
    url = sa.make_url(os.environ.get(MYSQL_URL_ENV) or DEFAULT_LOCAL_MYSQL_URL)
    try:
        pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            connect_timeout=3,
        ).close()
    except (pymysql.MySQLError, OSError) as exc:
        raise RuntimeError(
            f"No MySQL server answers at {url.render_as_string()} ({exc}). Start one, point "
            f"{MYSQL_URL_ENV} at one, or set {BACKEND_ENV}=containers.",
        ) from exc
    server_url = url._replace(database=None).render_as_string(hide_password=False)
    return server_url, lambda: None


def _start_kafka_container() -> tuple[str, Stop]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # releases before the "community" namespace
        from testcontainers.kafka import KafkaContainer

    container: Any = KafkaContainer(KAFKA_IMAGE).with_kraft()
    # As in production (docker-compose.yml): topics must be created explicitly.
    container.with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    try:
        container.start(timeout=KAFKA_START_TIMEOUT_S)
        bootstrap = container.get_bootstrap_server()
    except BaseException:
        _remove_quietly(container)
        raise
    return str(bootstrap), container.stop


def _remove_quietly(container: Any) -> None:
    """Remove a container that failed to start, without masking the original error."""
    with contextlib.suppress(Exception):
        container.stop()


# -- test databases on a MySQL server --------------------------------------------------------


def server_connection(server_url: str) -> pymysql.connections.Connection[Any]:
    url = sa.make_url(server_url)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
    )


def create_mysql_database(server_url: str) -> tuple[str, str]:
    """A new empty database on the server: its URL and its name."""
    name = f"kessai_t_{uuid.uuid4().hex[:12]}"
    with server_connection(server_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = sa.make_url(server_url).set(database=name)
    return url.render_as_string(hide_password=False), name


def drop_mysql_database(server_url: str, name: str) -> None:
    with server_connection(server_url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
