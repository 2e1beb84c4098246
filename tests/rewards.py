"""Helpers for tests of the rewards service: ``python -m rewards`` processes, their metrics,
and the grants the write store holds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from kessai.events import RewardGranted
from kessai.schema.write import reward_grants
from kessai.settings import Settings
from tests.integration.test_projector import count
from tests.pipeline import write_store_wallet_events

REPO = Path(__file__).resolve().parents[1]


def spawn_rewards(
    settings: Settings, home: Path, *, batch_size: int = 5, metrics_port: int | None = None
) -> subprocess.Popen[bytes]:
    """A ``python -m rewards`` process on the stores, topic and group of ``settings``, its
    output appended to ``home/rewards.log``; its metrics on ``metrics_port`` if given."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")},
        "KESSAI_WRITE_DB_URL": settings.resolved_write_db_url(),
        "KESSAI_KAFKA_BOOTSTRAP": settings.resolved_kafka_bootstrap(),
        "KESSAI_TOPIC": settings.topic,
        "KESSAI_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "KESSAI_REWARDS_GROUP_ID": settings.rewards_group_id,
        "KESSAI_REWARDS_BATCH_SIZE": str(batch_size),
        "KESSAI_HOME": str(home),
    }
    if metrics_port is not None:
        env["KESSAI_REWARDS_METRICS_PORT"] = str(metrics_port)
    return subprocess.Popen(
        [sys.executable, "-m", "rewards"],
        cwd=REPO,
        env=env,
        stdout=(home / "rewards.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def total(registry: CollectorRegistry, name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    )


def scraped(port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with ``labels``) served by a process on ``port``;
    0 while it does not answer yet."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def grants_count(engine: Engine) -> int:
    """The grants recorded (a take-back's row is negative)."""
    return count(engine, reward_grants, reward_grants.c.amount > 0)


def rewards_by_key(engine: Engine) -> Counter[tuple[str, str]]:
    """How many ``RewardGranted`` each (campaign, payment id or user) has in the write store."""
    granted: Counter[tuple[str, str]] = Counter()
    for event in write_store_wallet_events(engine):
        if isinstance(event, RewardGranted):
            p = event.payload
            granted[(p.campaign_id, str(p.payment_id) if p.payment_id else event.user_id)] += 1
    return granted
