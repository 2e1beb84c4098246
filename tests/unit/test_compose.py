"""docker-compose.yml stays consistent with the CLI and starts in the right order."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Processes that never exit on their own; every other kessai command is one-shot.
ONE_SHOT_COMMANDS = {"migrate", "reconcile"}


# -- helpers ------------------------------------------------------------------------------


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def registered_commands() -> set[str]:
    from kessai_cli.main import app

    # A group of subcommands; recent Typer releases vendor click, so no isinstance check.
    commands = getattr(typer.main.get_command(app), "commands", None)
    assert isinstance(commands, dict), "the kessai CLI must have subcommands"
    return set(commands)


def is_project_service(service: dict[str, Any]) -> bool:
    image = str(service.get("image", ""))
    return "build" in service or image.split(":")[0].rsplit("/", 1)[-1] == "kessai"


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(word) for word in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: no condition at all
        return {name: {} for name in deps}
    return dict(deps)


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable", False)


def is_long_running(service: dict[str, Any]) -> bool:
    if is_project_service(service):
        words = command_words(service)
        return len(words) < 2 or words[1] not in ONE_SHOT_COMMANDS
    return True


def command_problems(compose: dict[str, Any], commands: set[str]) -> list[str]:
    """Project services whose command is not a registered ``kessai`` subcommand."""
    problems = []
    for name, service in compose["services"].items():
        if not is_project_service(service):
            continue
        words = command_words(service)
        if len(words) < 2 or words[0] != "kessai":
            problems.append(f"{name}: command {words!r} is not `kessai <subcommand>`")
        elif words[1] not in commands:
            problems.append(f"{name}: `kessai {words[1]}` is not a registered command")
        elif words[1] == "up":
            problems.append(f"{name}: `kessai up` is the embedded dev mode, not a service")
    return problems


def dependency_problems(compose: dict[str, Any]) -> list[str]:
    services = compose["services"]
    problems = []
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            condition = (spec or {}).get("condition")
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
            if condition not in CONDITIONS:
                problems.append(f"{name} -> {dep}: no valid condition ({condition!r})")
            if condition == "service_healthy" and not has_healthcheck(services.get(dep, {})):
                problems.append(f"{name} waits for {dep} to be healthy, it has no healthcheck")
    return problems


def healthcheck_problems(compose: dict[str, Any]) -> list[str]:
    return [
        f"{name}: long-running service without a healthcheck"
        for name, service in compose["services"].items()
        if not is_project_service(service) and is_long_running(service)
        if not has_healthcheck(service)
    ]


def kafka_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if "kafka" in str(service.get("image", "")).lower()
    }


# -- the real compose file ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_expected_services(compose: dict[str, Any]) -> None:
    expected = {"write-db", "read-db", "kafka", "redis", "migrate", "command-api", "relay"}
    assert expected <= set(compose["services"])


def test_project_commands_are_registered_cli_commands(compose: dict[str, Any]) -> None:
    assert command_problems(compose, registered_commands()) == []


def test_project_services_use_the_project_image(compose: dict[str, Any]) -> None:
    for name in ("migrate", "command-api", "relay"):
        assert is_project_service(compose["services"][name]), name


def test_every_dependency_has_a_condition(compose: dict[str, Any]) -> None:
    assert dependency_problems(compose) == []


def test_long_running_infrastructure_has_healthchecks(compose: dict[str, Any]) -> None:
    assert healthcheck_problems(compose) == []


def test_command_api_has_a_readiness_healthcheck(compose: dict[str, Any]) -> None:
    check = compose["services"]["command-api"]["healthcheck"]["test"]
    assert "/readyz" in " ".join(map(str, check))


@pytest.mark.parametrize("service", ["command-api", "relay"])
def test_processes_wait_for_migrations(compose: dict[str, Any], service: str) -> None:
    deps = depends_on(compose["services"][service])
    assert deps.get("migrate", {}).get("condition") == "service_completed_successfully"


def test_migrate_is_one_shot(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert command_words(migrate)[:2] == ["kessai", "migrate"]
    assert str(migrate.get("restart", "no")) in {"no", "False", "false", "on-failure"}


def test_kafka_auto_topic_creation_is_disabled(compose: dict[str, Any]) -> None:
    brokers = kafka_services(compose)
    assert brokers, "no Kafka service"
    for name, service in brokers.items():
        value = environment(service).get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "")
        assert value.lower() == "false", f"{name}: auto topic creation is not disabled"


def test_mysql_allows_trigger_creation(compose: dict[str, Any]) -> None:
    for name in ("write-db", "read-db"):
        assert "--log-bin-trust-function-creators=1" in command_words(compose["services"][name])


def test_project_services_never_use_embedded_defaults(compose: dict[str, Any]) -> None:
    """Unset URLs would silently mean SQLite files and the embedded broker."""
    for name, service in compose["services"].items():
        if not is_project_service(service):
            continue
        env = environment(service)
        for key in ("KESSAI_WRITE_DB_URL", "KESSAI_READ_DB_URL", "KESSAI_KAFKA_BOOTSTRAP"):
            assert env.get(key, "").strip(), f"{name}: {key} is not set"
        assert env["KESSAI_WRITE_DB_URL"].startswith("mysql+pymysql://"), name
        assert env["KESSAI_READ_DB_URL"].startswith("mysql+pymysql://"), name


def test_the_command_api_is_reached_through_its_proxy_only(compose: dict[str, Any]) -> None:
    """Overload is refused before Python: nginx in front, the API's port not published."""
    services = compose["services"]
    assert "ports" not in services["command-api"]
    proxy = services["command-proxy"]
    assert str(proxy["image"]).startswith("nginx:")
    assert proxy["ports"], "the proxy publishes the command API's port"
    assert depends_on(proxy)["command-api"]["condition"] == "service_healthy"
    assert has_healthcheck(proxy)
    env = environment(proxy)
    assert env["KESSAI_PROXY_UPSTREAM"] == "command-api:8000"
    mounted = " ".join(map(str, proxy["volumes"]))
    assert "deploy/nginx/command-api.conf.template:/etc/nginx/templates/" in mounted


def test_command_api_listens_on_all_interfaces(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["command-api"])
    assert env.get("KESSAI_COMMAND_API_HOST") == "0.0.0.0"


# -- the checks themselves catch broken files ---------------------------------------------

BROKEN = """
services:
  db:
    image: mysql:8.4
  kafka:
    image: apache/kafka:3.8.0
    healthcheck: {test: ["CMD", "true"]}
  bogus:
    build: .
    command: kessai nonexistent
  dev:
    image: kessai:latest
    command: ["kessai", "up"]
  plain:
    build: .
    command: python -m kessai
  relay:
    build: .
    command: kessai relay
    depends_on: [kafka]
  api:
    build: .
    command: kessai command-api
    depends_on:
      db: {condition: service_healthy}
      ghost: {condition: service_started}
"""


def test_checks_reject_a_broken_file() -> None:
    broken = yaml.safe_load(BROKEN)
    assert command_problems(broken, {"relay", "command-api", "up"}) == [
        "bogus: `kessai nonexistent` is not a registered command",
        "dev: `kessai up` is the embedded dev mode, not a service",
        "plain: command ['python', '-m', 'kessai'] is not `kessai <subcommand>`",
    ]
    assert dependency_problems(broken) == [
        "relay -> kafka: no valid condition (None)",
        "api waits for db to be healthy, it has no healthcheck",
        "api depends on unknown service ghost",
    ]
    assert healthcheck_problems(broken) == ["db: long-running service without a healthcheck"]
    assert "KAFKA_AUTO_CREATE_TOPICS_ENABLE" not in environment(kafka_services(broken)["kafka"])
