"""Settings, read from the environment with the prefix ``KESSAI_``.

Built in ``create_app()`` / ``main()``, never at import time. Unset database URLs mean SQLite
files under ``KESSAI_HOME``; an unset Kafka bootstrap means the embedded broker.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TOPIC = "kessai.payments.v1"
EMBEDDED_BROKER_PORT = 9092


class Settings(BaseSettings):
    """Every knob of every kessai process. Each field is the env var ``KESSAI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KESSAI_", extra="ignore")

    home: Path = Field(Path(".kessai"), description="Where embedded files (SQLite, logs) live.")
    write_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the write store; unset: SQLite in KESSAI_HOME."
    )
    read_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the read database; unset: SQLite in KESSAI_HOME."
    )
    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers; unset: the embedded broker."
    )
    embedded_broker_port: int = Field(EMBEDDED_BROKER_PORT, ge=1, le=65535)
    topic: str = DEFAULT_TOPIC
    topic_partitions: int = Field(8, ge=1, le=1024)
    topic_replication_factor: int = Field(1, ge=1, le=16)

    command_api_host: str = "127.0.0.1"
    command_api_port: int = Field(8000, ge=1, le=65535)

    idempotency_retention_hours: int = Field(
        24, ge=1, description="How long an Idempotency-Key is remembered after its request."
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    refund_max_attempts: int = Field(
        30, ge=1, description="Optimistic-concurrency attempts before a refund gives up (409)."
    )

    outbox_shards: int = Field(
        8, ge=1, le=256, description="Outbox shards; each is published by one relay at a time."
    )
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    relay_poll_interval_ms: int = Field(50, ge=1)
    relay_lease_seconds: float = Field(10.0, gt=0)
    relay_retry_max_backoff_ms: int = Field(2_000, ge=10)
    kafka_request_timeout_ms: int = Field(10_000, ge=1000)

    @field_validator("write_db_url", "read_db_url", "kafka_bootstrap", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def resolved_write_db_url(self) -> str:
        return self.write_db_url or f"sqlite:///{(self.home / 'write.db').resolve()}"

    def resolved_read_db_url(self) -> str:
        return self.read_db_url or f"sqlite:///{(self.home / 'read.db').resolve()}"

    def resolved_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.embedded_broker_port}"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.kafka_bootstrap is None
