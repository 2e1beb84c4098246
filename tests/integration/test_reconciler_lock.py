"""The reconciler's lock under stops and crashes: a live run keeps it however long a phase takes,
a stopped run gives it back at once, and a killed run's lock lapses within its short lifetime.
And the scheduled reconciler as `kessai up` runs it: its full audit, on /metrics.

Each run here is slow on purpose: payments missing on the read side and no projector, so the
repair waits for a projector that never comes (``KESSAI_RECONCILE_VERIFY_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.broker import free_port
from kessai.clock import as_utc, utcnow
from kessai.schema.read import reconciler_state, reconciliation_runs
from kessai.schema.write import outbox
from kessai.settings import Settings
from reconciler.service import Reconciler
from tests.pipeline import make_traffic, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend() -> str:
    """MariaDB: the production shape, and a lock row other processes can see at once."""
    return "mysql"


def lock_of(read_engine: Engine) -> tuple[str | None, datetime | None]:
    with read_engine.connect() as conn:
        row = conn.execute(
            sa.select(reconciler_state.c.lock_owner, reconciler_state.c.lock_expires_at)
        ).first()
    if row is None:
        return None, None
    return row.lock_owner, None if row.lock_expires_at is None else as_utc(row.lock_expires_at)


def held(read_engine: Engine) -> bool:
    owner, expires = lock_of(read_engine)
    return owner is not None and expires is not None and expires > utcnow()


def outcomes(read_engine: Engine) -> list[str | None]:
    with read_engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(reconciliation_runs.c.outcome).order_by(reconciliation_runs.c.run_id)
            ).scalars()
        )


def lose_before_publication(write_engine: Engine) -> None:
    make_traffic(write_engine, payments_count=3, refund_share=0.0, seed=61)
    with write_engine.begin() as conn:
        conn.execute(outbox.delete())


@pytest.fixture
def slow_run_env(pipeline_settings: Settings, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KESSAI_HOME": str(tmp_path),
        "KESSAI_WRITE_DB_URL": pipeline_settings.resolved_write_db_url(),
        "KESSAI_READ_DB_URL": pipeline_settings.resolved_read_db_url(),
        "KESSAI_KAFKA_BOOTSTRAP": pipeline_settings.resolved_kafka_bootstrap(),
        "KESSAI_TOPIC": pipeline_settings.topic,
        "KESSAI_TOPIC_PARTITIONS": "4",
        "KESSAI_RECONCILE_CONFIRM_SECONDS": "0",
        "KESSAI_RECONCILE_VERIFY_TIMEOUT_SECONDS": "120",
        "KESSAI_RECONCILE_LOCK_SECONDS": "3",
    }


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "reconciler", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_live_run_keeps_its_lock_through_a_phase_longer_than_its_lifetime(
    pipeline_settings: Settings, write_engine: Engine, read_engine: Engine
) -> None:
    settings = pipeline_settings.model_copy(
        update={
            "reconcile_confirm_seconds": 0,
            "reconcile_verify_timeout_seconds": 4.0,
            "reconcile_lock_seconds": 1.0,
        }
    )
    await asyncio.to_thread(lose_before_publication, write_engine)
    slow = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)
    other = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)
    running = asyncio.create_task(slow.run())
    await wait_until(lambda: held(read_engine))
    await asyncio.sleep(2.5)  # well past the lock's lifetime, in the repair's wait
    refused = await other.run(dry_run=True)
    assert (refused.outcome, refused.exit_code) == ("skipped", 2)
    assert (await running).exit_code == 1  # the repair waited in vain: drift remains


async def test_a_killed_run_frees_the_lock_within_its_lifetime_and_a_stopped_one_at_once(
    pipeline_settings: Settings,
    write_engine: Engine,
    read_engine: Engine,
    slow_run_env: dict[str, str],
    spawned: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    assert Settings.model_fields["reconcile_lock_seconds"].default <= 30
    await asyncio.to_thread(lose_before_publication, write_engine)

    # Killed mid-run: nothing releases the lock, its lifetime (3 s here) does.
    killed = spawn([], slow_run_env, tmp_path / "killed.log")
    spawned.append(killed)
    await wait_until(lambda: outcomes(read_engine) == [None], within=60)
    await asyncio.sleep(4.5)  # longer than the lock's lifetime: the heartbeat keeps it
    assert held(read_engine)
    killed.kill()
    killed.wait()
    killed_at = time.monotonic()
    settings = pipeline_settings.model_copy(update={"reconcile_confirm_seconds": 0})
    next_run = Reconciler(write_engine=write_engine, read_engine=read_engine, settings=settings)
    while (result := await next_run.run(dry_run=True)).outcome == "skipped":
        assert time.monotonic() - killed_at < 3 + 2, "the killed run's lock outlived its lifetime"
        await asyncio.sleep(0.2)
    assert result.exit_code == 1

    # Stopped (SIGTERM, as `kessai up` stops it) while on its schedule: the lock is free at once.
    stopped = spawn(["--every", "5m"], slow_run_env, tmp_path / "stopped.log")
    spawned.append(stopped)
    await wait_until(lambda: len(outcomes(read_engine)) == 3 and held(read_engine), within=60)
    await asyncio.sleep(1.0)  # into the repair's wait
    stopped.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(stopped.wait, 10) == 2
    assert lock_of(read_engine)[0] is None
    assert outcomes(read_engine)[-1] == "stopped"


def scrape(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return ""


async def test_the_scheduled_full_audit_shows_on_metrics_and_in_the_history(
    write_engine: Engine,
    read_engine: Engine,
    slow_run_env: dict[str, str],
    spawned: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    await asyncio.to_thread(make_traffic, write_engine, payments_count=5, seed=62)
    port = free_port()
    env = {**slow_run_env, "KESSAI_RECONCILER_METRICS_PORT": str(port)}
    # The command line `kessai up` and docker compose use, unchanged: no full audit is recorded
    # yet, so the first run is one.
    scheduled = spawn(["--every", "5m"], env, tmp_path / "scheduled.log")
    spawned.append(scheduled)
    url = f"http://127.0.0.1:{port}/metrics"
    full = 'kessai_reconcile_last_success_timestamp_seconds{scope="full"}'
    await wait_until(lambda: full in scrape(url), within=60)
    text = await asyncio.to_thread(scrape, url)
    assert 'kessai_reconcile_runs_total{outcome="consistent",scope="full"} 1.0' in text
    assert 'scope="incremental"' not in text.split("kessai_reconcile_last_success")[1]
    scheduled.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(scheduled.wait, 10) == 0

    history = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "reconciler", "--history"],
        cwd=REPO, env={**env, "COLUMNS": "250"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "last completed full audit: never" not in history.stdout
    assert "last completed full audit: 20" in history.stdout
