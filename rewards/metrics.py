"""The rewards service's Prometheus metrics, and what one committed batch adds to them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rewards.decide import BatchDecision

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Seconds from a payment (or registration) recorded to its grant recorded: a sign-up storm
makes minutes of it."""


class RewardsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.grants = Counter(
            "kessai_rewards_grants_total",
            "Grants recorded (their rate is grants/s).",
            ["campaign", "kind"],
            registry=registry,
        )
        self.granted = Counter(
            "kessai_rewards_granted_minor_units_total",
            "What the grants gave, in each campaign's minor units.",
            ["campaign"],
            registry=registry,
        )
        self.taken_back = Counter(
            "kessai_rewards_taken_back_minor_units_total",
            "Cashback given back by wallets to campaigns, by kind (refund: at a refund; debt: "
            "paid off later from a credit), in each campaign's minor units.",
            ["campaign", "kind"],
            registry=registry,
        )
        self.owed = Counter(
            "kessai_rewards_owed_minor_units_total",
            "Cashback refunds took back that wallets could not give (a debt to the campaign), "
            "in each campaign's minor units; what is owed now is this minus the debt kind of "
            "kessai_rewards_taken_back_minor_units_total.",
            ["campaign"],
            registry=registry,
        )
        self.lag = Histogram(
            "kessai_rewards_grant_lag_seconds",
            "A grant's recorded_at minus its payment's (or registration's) recorded_at.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.remaining = Gauge(
            "kessai_rewards_budget_remaining",
            "What is left of a campaign's budget, in its minor units, as the last batch left it.",
            ["campaign"],
            registry=registry,
        )
        self.exhausted = Gauge(
            "kessai_rewards_exhausted_campaigns",
            "Campaigns whose budget is spent.",
            registry=registry,
        )
        self.skipped = Counter(
            "kessai_rewards_skipped_total",
            "Events that earned nothing from a campaign, by reason (the rules', already "
            "granted, exhausted, a wallet in another currency).",
            ["reason"],
            registry=registry,
        )
        self.undecodable = Counter(
            "kessai_rewards_undecodable_total",
            "Records of a granting kind that could not be decoded (skipped; the projector "
            "dead-letters them).",
            registry=registry,
        )
        self.retries = Counter(
            "kessai_rewards_batches_retried_total",
            "Grant transactions decided again after losing a race (a key, a wallet's or a "
            "budget's version taken meanwhile, a deadlock).",
            registry=registry,
        )
        self.failed = Counter(
            "kessai_rewards_batches_failed_total",
            "Batches whose transaction failed (the write store unreachable, too many races): "
            "fetched again.",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "kessai_rewards_batch_seconds", "Time of one grant transaction.", registry=registry
        )

    def count(self, decision: BatchDecision, seconds: float) -> None:
        """Count a committed batch."""
        self.batch_seconds.observe(seconds)
        for grant in decision.grants:
            self.grants.labels(grant.campaign_id, grant.kind).inc()
            self.granted.labels(grant.campaign_id).inc(grant.amount)
            self.lag.observe(max(grant.lag_seconds, 0.0))
        for taken in decision.taken_back:
            self.taken_back.labels(taken.campaign_id, taken.kind).inc(taken.amount)
            if taken.kind == "refund":
                self.owed.labels(taken.campaign_id).inc(taken.owed)
        for reason, count in decision.skipped.items():
            self.skipped.labels(reason).inc(count)
        for campaign_id, remaining in decision.remaining.items():
            self.remaining.labels(campaign_id).set(remaining)
        if decision.remaining or decision.exhausted:
            self.exhausted.set(len(decision.exhausted))
