"""Settings, read from the environment with the prefix ``KESSAI_``.

Built in ``create_app()`` / ``main()``, never at import time. Unset database URLs mean SQLite
files under ``KESSAI_HOME``; an unset Kafka bootstrap means the embedded broker.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kessai.clock import parse_interval

DEFAULT_TOPIC = "kessai.payments.v1"
EMBEDDED_BROKER_PORT = 9092


class MissingKeyStore(RuntimeError):
    """A service outside development mode has no key store configured."""


class Settings(BaseSettings):
    """Every knob of every kessai process. Each field is the env var ``KESSAI_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KESSAI_", extra="ignore")

    home: Path = Field(Path(".kessai"), description="Where embedded files (SQLite, logs) live.")
    environment: Literal["development", "production"] = Field(
        "development",
        description="production: no embedded defaults for secrets; the APIs refuse to start "
        "without KESSAI_KEYS_DB_URL.",
    )
    write_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the write store; unset: SQLite in KESSAI_HOME."
    )
    read_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the read database; unset: SQLite in KESSAI_HOME."
    )
    keys_db_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the key store (API keys); unset: SQLite in KESSAI_HOME, "
        "development only.",
    )
    auth_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a key lookup is cached; a revoked key stops working within this.",
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
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Requests whose headers add up to more get 431."
    )
    refund_max_attempts: int = Field(
        30,
        ge=1,
        description="Optimistic-concurrency attempts before a write that lost a race to the "
        "same payment or wallet gives up (409 concurrent_modification).",
    )
    wallet_max_balance: int = Field(
        1_000_000,
        ge=1,
        le=10**12,
        description="The most a wallet may hold, in minor units of its currency (default "
        "1,000,000 JPY): a top-up past it is 409 balance_limit_exceeded; refunds may pass it.",
    )
    group_commit: bool = Field(
        True,
        description="Coalesce concurrent payment and refund writes into one write-store "
        "transaction (command_service/batching.py); off: one transaction per request.",
    )
    group_commit_max_batch: int = Field(
        128, ge=1, le=1_000, description="Most requests recorded in one group commit."
    )
    group_commit_max_delay_ms: float = Field(
        2.0,
        ge=0,
        le=1_000,
        description="Longest a request waits for batch-mates before its batch is committed.",
    )
    group_commit_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Attempts of a group commit that lost a race to another process (a wallet's "
        "or payment's next version, a key): decided again as a whole, on fresh state, before "
        "its requests are recorded one by one.",
    )

    acquirer_url: str | None = Field(
        None,
        description="Base URL of the card acquirer (POST {url}/authorizations); unset: card "
        "payments are refused with 503 acquirer_unavailable.",
    )
    acquirer_timeout_ms: int = Field(
        2_000,
        ge=10,
        le=60_000,
        description="Hard limit of one acquirer call (connect, send, read the answer); waiting "
        "for a bulkhead slot is limited to the same time.",
    )
    acquirer_max_concurrency: int = Field(
        32, ge=1, le=1_000, description="Most acquirer calls in flight at once (the bulkhead)."
    )
    acquirer_max_attempts: int = Field(
        2,
        ge=1,
        le=5,
        description="Attempts of one authorization (same Idempotency-Key) on timeouts, "
        "connection errors and 5xx.",
    )
    acquirer_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed acquirer calls that open the circuit breaker."
    )
    acquirer_breaker_reset_seconds: float = Field(
        10.0, gt=0, description="How long the breaker stays open before one probe call."
    )

    admission_enabled: bool = Field(
        False, description="Device-group admission control on POST /v1/payments."
    )
    admission_percent: float = Field(
        100.0, ge=0, le=100, description="Share of devices admitted in each window."
    )
    admission_window_seconds: int = Field(
        300, ge=10, le=86_400, description="How long a device stays admitted (or refused)."
    )
    admission_without_device: Literal["admit", "refuse"] = Field(
        "admit", description="What admission control does with requests without X-Device-Id."
    )
    admission_adaptive: bool = Field(
        True,
        description="While admission control is enabled, lower the admitted share while the "
        "load shedder's queue delay stays above admission_target_delay_ms, and raise it back.",
    )
    admission_floor_percent: float = Field(
        10.0, ge=0, le=100, description="The adaptive share never falls below this."
    )
    admission_target_delay_ms: float = Field(
        5.0, gt=0, le=10_000, description="Queue delay the adaptive share steers below."
    )
    admission_allow_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API key ids that bypass admission control."
    )
    admission_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Client IPs or networks that bypass admission control."
    )

    rate_limit_per_ip: str = Field(
        "2000/second", description="Requests per client IP on either API (before the key)."
    )
    rate_limit_writes: str = Field(
        "2000/second", description="Requests per API key on the command API."
    )
    rate_limit_reads: str = Field("50/second", description="Requests per API key on the query API.")
    rate_limit_expensive: str = Field(
        "10/minute",
        description="CSV exports and summaries over more than 31 days, per API key.",
    )
    rate_limit_on_error: Literal["allow", "refuse"] = Field(
        "allow",
        description="When the rate-limit counters (Redis) cannot be reached: let requests "
        "through, or refuse them with 503 rate_limit_unavailable.",
    )

    overload_max_in_flight: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Requests one API process works on at once; the next ones wait (see "
        "overload_max_queue_wait_ms) or get 503 overloaded.",
    )
    overload_max_queue_wait_ms: float = Field(
        20.0,
        ge=0,
        le=10_000,
        description="Longest a request waits for a slot before 503 overloaded; at most "
        "overload_max_in_flight requests wait at once.",
    )
    overload_reserved_percent: float = Field(
        25.0,
        ge=0,
        lt=100,
        description="Share of the slots only refunds and recently served devices may use "
        "(command API).",
    )
    overload_recent_devices: int = Field(
        100_000, ge=1, description="Most devices remembered as recently served, per process."
    )
    overload_recent_device_seconds: float = Field(
        300.0, gt=0, description="How long a device answered 2xx counts as recently served."
    )

    outbox_shards: int = Field(
        8, ge=1, le=256, description="Outbox shards; each is published by one relay at a time."
    )
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    relay_poll_interval_ms: int = Field(50, ge=1)
    relay_lease_seconds: float = Field(10.0, gt=0)
    relay_retry_max_backoff_ms: int = Field(2_000, ge=10)
    relay_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the relay's Prometheus metrics here."
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the relay's, projector's and reconciler's metrics listen on: "
        "0.0.0.0 in a container, so a scraper outside it can reach them.",
    )
    kafka_request_timeout_ms: int = Field(10_000, ge=1000)

    projector_group_id: str = Field("kessai-projector", min_length=1)
    projector_batch_size: int = Field(
        2_000, ge=1, le=50_000, description="Most records applied in one read-DB transaction."
    )
    projector_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the projector's Prometheus metrics here."
    )
    rewards_group_id: str = Field("kessai-rewards", min_length=1)
    rewards_batch_size: int = Field(
        500, ge=1, le=5_000, description="Most records one grant transaction decides."
    )
    rewards_attempts: int = Field(
        20,
        ge=1,
        description="Times a grant batch is decided again after losing a race to another "
        "rewards instance (or a command) before the batch is fetched again.",
    )
    rewards_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the rewards service's Prometheus metrics here."
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
    reconcile_grant_grace_seconds: float = Field(
        60.0,
        ge=0,
        description="A payment (a registration) is reported without its grant only this long "
        "after it was recorded: grants are asynchronous.",
    )
    reconcile_lock_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a run's lock lasts unless renewed (one run at a time); a live "
        "run renews it every third of this, so a killed run's lock lapses within it.",
    )
    reconcile_full_audit_every: str = Field(
        "24h",
        description="`kessai reconcile --every` also runs a full audit this often (30s, 5m, 24h; "
        "0: never), counted from the last completed one recorded.",
    )
    reconcile_full_audit_pause_seconds: float = Field(
        0.05,
        ge=0,
        description="A scheduled full audit pauses this long after each block of 5,000 "
        "payments, so the dashboards keep the read database.",
    )
    reconciler_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve the scheduled reconciler's Prometheus metrics here (`--every`).",
    )
    reconcile_chunk_size: int = Field(
        500, ge=1, le=10_000, description="Payments compared per bulk query."
    )

    @field_validator("reconcile_full_audit_every")
    @classmethod
    def _interval(cls, value: str) -> str:
        parse_interval(value, zero_allowed=True)
        return value

    def full_audit_every_seconds(self) -> float:
        """``KESSAI_RECONCILE_FULL_AUDIT_EVERY`` in seconds (0: no scheduled full audit)."""
        return parse_interval(self.reconcile_full_audit_every, zero_allowed=True)

    @field_validator(
        "write_db_url",
        "read_db_url",
        "query_db_url",
        "keys_db_url",
        "acquirer_url",
        "kafka_bootstrap",
        "redis_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admission_allow_keys", "admission_allow_ips", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("admission_allow_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator(
        "rate_limit_per_ip", "rate_limit_writes", "rate_limit_reads", "rate_limit_expensive"
    )
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"not a rate limit: {value!r} (use e.g. 100/second)") from None
        return value

    def resolved_write_db_url(self) -> str:
        return self.write_db_url or f"sqlite:///{(self.home / 'write.db').resolve()}"

    def resolved_read_db_url(self) -> str:
        return self.read_db_url or f"sqlite:///{(self.home / 'read.db').resolve()}"

    def resolved_query_db_url(self) -> str:
        return self.query_db_url or self.resolved_read_db_url()

    def resolved_keys_db_url(self) -> str:
        """The key store's URL. Outside development there is no default: a service that
        would otherwise check keys against an empty local file refuses to start."""
        if self.keys_db_url:
            return self.keys_db_url
        if self.environment != "development":
            raise MissingKeyStore(
                "KESSAI_KEYS_DB_URL is not set: outside development the APIs need a key store "
                "(see README, API keys)."
            )
        return f"sqlite:///{(self.home / 'keys.db').resolve()}"

    def resolved_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.embedded_broker_port}"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.kafka_bootstrap is None
