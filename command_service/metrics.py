"""Command-side metrics: the outbox backlog and the age of its oldest row, read on scrape."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from kessai.clock import as_utc, utcnow
from kessai.schema.write import outbox

log = logging.getLogger(__name__)


class OutboxCollector(Collector):
    """Backlog = rows written but not yet published. A growing backlog or an old oldest row
    means the relay is stuck or the broker is down; payments are still being accepted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        backlog = GaugeMetricFamily(
            "kessai_outbox_backlog", "Outbox rows not yet published to Kafka."
        )
        oldest = GaugeMetricFamily(
            "kessai_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row (0 when empty).",
        )
        try:
            with self.engine.connect() as conn:
                count, first = conn.execute(
                    sa.select(sa.func.count(), sa.func.min(outbox.c.created_at))
                ).one()
        except sa.exc.SQLAlchemyError:
            log.warning("outbox metrics unavailable: write DB unreachable")
            return
        backlog.add_metric([], float(count))
        age = (utcnow() - as_utc(first)).total_seconds() if first is not None else 0.0
        oldest.add_metric([], max(age, 0.0))
        yield backlog
        yield oldest
