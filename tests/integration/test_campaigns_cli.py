"""``kessai campaigns`` against the real command API served over HTTP (uvicorn in a thread),
on SQLite and on MariaDB: what the commands print is what the API answered and the write store
holds, a refusal prints its code and fields and exits 1, and a repeated command with the same
Idempotency-Key changes nothing twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner, Result

from command_service.app import create_app
from kessai.auth import ADMIN, PAYMENTS_WRITE
from kessai.broker import free_port
from kessai.settings import Settings
from kessai_cli.main import app as cli_app
from tests.helpers import api_key
from tests.integration.test_api_schemas import Server
from tests.integration.test_campaign_admin import cashback, stream, written


@pytest.fixture
def served(settings: Settings) -> Iterator[str]:
    """The command API's URL, served over HTTP."""
    with Server(create_app(settings)) as server:
        yield server.url


def kessai(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli_app, ["campaigns", *args], env=env)


def answer(outcome: Result) -> Any:
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.output)


def test_a_campaign_created_from_a_file_changed_stopped_and_read_back(
    settings: Settings, write_engine: Engine, served: str, tmp_path: Path
) -> None:
    key = api_key(settings, ADMIN)
    at = ["--url", served, "--api-key", key]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(cashback()))
    created = answer(kessai("create", "--file", str(rules), "--budget", "2000000", "--json", *at))
    assert (created["campaign_id"], created["rules"]["budget"]) == ("winter-20", 2_000_000)
    assert created["actor"] == key.split("_")[1]
    changed = answer(kessai("change", "winter-20", "--budget", "3000000", "--json", *at))
    assert (changed["version"], changed["remaining"]) == (2, 3_000_000)
    shown = kessai("show", "winter-20", *at)
    assert shown.exit_code == 0, shown.output
    assert "active" in shown.output
    assert "3000000" in shown.output
    listed = answer(kessai("list", "--json", *at))
    assert [(c["campaign_id"], c["version"]) for c in listed] == [("winter-20", 2)]
    stopped = answer(kessai("stop", "winter-20", "--reason", "moved to spring", "--json", *at))
    assert (stopped["status"], stopped["version"]) == ("stopped", 3)
    again = kessai("stop", "winter-20", *at)
    assert again.exit_code == 1
    assert "409 campaign_not_active" in again.output
    assert [e.event_type for e in stream(write_engine)] == [
        "CampaignCreated",
        "CampaignChanged",
        "CampaignStopped",
    ]


def test_the_options_alone_create_a_welcome_bonus_with_the_development_key(
    settings: Settings, served: str, tmp_path: Path
) -> None:
    """Without --api-key the CLI takes the `admin` key that `kessai up` wrote."""
    (tmp_path / "dev-keys.json").write_text(json.dumps({"admin": api_key(settings, ADMIN)}))
    created = answer(
        kessai(
            "create", "--kind", "welcome_bonus", "--campaign-id", "signup-500",
            "--name", "500 yen on sign-up", "--currency", "JPY", "--budget", "10000000",
            "--starts-at", "2026-12-01T00:00:00+09:00", "--ends-at", "2027-01-01T00:00:00+09:00",
            "--url", served, "--json",
            env={"KESSAI_HOME": str(tmp_path)},
        )
    )  # fmt: skip
    assert created["rules"]["amount"] == 500
    assert created["status"] in ("active", "ended")  # by the test machine's clock


def test_invalid_rules_print_the_code_and_each_field_and_exit_1(
    settings: Settings, write_engine: Engine, served: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(cashback(rate_bp=10_001, currency="ABC")))
    at = ["--url", served, "--api-key", api_key(settings, ADMIN)]
    refused = kessai("create", "--file", str(rules), *at)
    assert refused.exit_code == 1
    assert "422 invalid_campaign" in refused.output
    assert "rate_bp:" in refused.output
    assert "currency:" in refused.output
    missing = kessai("change", "no-such", "--budget", "5", *at)
    assert missing.exit_code == 1
    assert "404 campaign_not_found" in missing.output
    forbidden = kessai("list", "--url", served, "--api-key", api_key(settings, PAYMENTS_WRITE))
    assert forbidden.exit_code == 1
    assert "403 forbidden" in forbidden.output
    assert written(write_engine)["campaign_events"] == 0


def test_a_command_repeated_with_its_idempotency_key_changes_nothing_twice(
    settings: Settings, write_engine: Engine, served: str, tmp_path: Path
) -> None:
    at = ["--url", served, "--api-key", api_key(settings, ADMIN), "--json"]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(cashback()))
    raise_it = ["change", "winter-20", "--budget", "2000000", "--idempotency-key", "raise-it"]
    assert answer(kessai("create", "--file", str(rules), *at))["version"] == 1
    raised = answer(kessai(*raise_it, *at))
    again = answer(kessai(*raise_it, *at))
    assert again == raised
    assert [e.version for e in stream(write_engine)] == [1, 2]


def test_an_api_that_cannot_be_reached_exits_3(settings: Settings) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    outcome = kessai("list", "--url", unreachable, "--api-key", "kessai_0_0")
    assert outcome.exit_code == 3
    assert "cannot reach the command API" in outcome.output
