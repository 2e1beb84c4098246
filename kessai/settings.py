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

    projector_group_id: str = Field("kessai-projector", min_length=1)
    projector_batch_size: int = Field(
        2_000, ge=1, le=50_000, description="Most records applied in one read-DB transaction."
    )
    projector_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the projector's Prometheus metrics here."
    )
    query_api_host: str = "127.0.0.1"
    query_api_port: int = Field(8001, ge=1, le=65535)
    query_db_url: str | None = Field(
        None,
        description="URL the query API reads with (a SELECT-only user in production); "
        "unset: KESSAI_READ_DB_URL.",
    )
    redis_url: str | None = Field(
        None, description="Redis for shared caches; unset: caches are per process."
    )
    summary_cache_seconds: float = Field(
        2.0, ge=0, description="How long a merchant's summary is served from cache."
    )
    csv_max_rows: int = Field(1_000_000, ge=1, description="Most rows one CSV export may hold.")
    default_merchant_time_zone: str = Field(
        "Asia/Tokyo", description="Time zone of merchant days unless the merchant has its own."
    )
    reconcile_safety_margin_seconds: float = Field(
        60.0,
        ge=0,
        description="An incremental reconciliation re-checks events this much older than its "
        "watermark (commit latency, clock skew).",
    )
    reconcile_outbox_stuck_seconds: float = Field(
        300.0, gt=0, description="An outbox row older than this is reported as a stuck relay."
    )
    reconcile_verify_timeout_seconds: float = Field(
        60.0, gt=0, description="How long a repair waits for the projector to fix the read side."
    )
    reconcile_confirm_seconds: float = Field(
        2.0,
        ge=0,
        description="A difference is confirmed by a second look this much later (projector lag "
        "is not drift).",
    )
    reconcile_lock_seconds: float = Field(
        300.0, gt=0, description="How long a run's lock lasts unless renewed (one run at a time)."
    )
    reconcile_chunk_size: int = Field(
        500, ge=1, le=10_000, description="Payments compared per bulk query."
    )

    @field_validator(
        "write_db_url", "read_db_url", "query_db_url", "kafka_bootstrap", "redis_url", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def resolved_write_db_url(self) -> str:
        return self.write_db_url or f"sqlite:///{(self.home / 'write.db').resolve()}"

    def resolved_read_db_url(self) -> str:
        return self.read_db_url or f"sqlite:///{(self.home / 'read.db').resolve()}"

    def resolved_query_db_url(self) -> str:
        return self.query_db_url or self.resolved_read_db_url()

    def resolved_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.embedded_broker_port}"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.kafka_bootstrap is None
