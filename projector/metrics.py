"""The projector's Prometheus metrics, and what one batch did (counted into them)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int
    duplicates: int
    skipped: int
    parked: int
    dead_letters: int


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied = Counter(
            "kessai_projector_events_applied_total", "Events applied.", registry=registry
        )
        self.duplicates = Counter(
            "kessai_projector_duplicates_total", "Events skipped as duplicates.", registry=registry
        )
        self.skipped = Counter(
            "kessai_projector_skipped_total",
            "Events known and skipped: registrations, which the read side does not show yet.",
            registry=registry,
        )
        self.parked = Counter(
            "kessai_projector_parked_total", "Events parked behind a gap.", registry=registry
        )
        self.dead_letters = Counter(
            "kessai_projector_dead_letters_total", "Records dead-lettered.", registry=registry
        )
        self.log_resets = Counter(
            "kessai_projector_log_resets_total",
            "Partitions whose log was found reset (started again from the beginning).",
            registry=registry,
        )
        self.lag = Gauge(
            "kessai_projector_lag_records",
            "Records between the projector's position and the end of the partition.",
            ["partition"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "kessai_projector_batch_seconds", "Time to apply one batch.", registry=registry
        )

    def count(self, result: BatchResult, seconds: float) -> None:
        """Count a committed batch."""
        self.batch_seconds.observe(seconds)
        self.applied.inc(result.applied)
        self.duplicates.inc(result.duplicates)
        self.skipped.inc(result.skipped)
        self.parked.inc(result.parked)
        self.dead_letters.inc(result.dead_letters)
