"""The reconciler bench's data set: a consistent write store and read side, planned, built with
the real event classes and the ledger's fold, and loaded in bulk (multi-row INSERTs on MySQL,
the stdlib driver's ``executemany`` on SQLite, a writer thread per database)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from rich.progress import Progress

from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
    event_to_json,
)
from kessai.ids import new_id
from kessai.ledger import PaymentState, apply
from kessai.settings import Settings

if TYPE_CHECKING:  # bench.stores imports this module's server helpers
    from bench.stores import Stores
from bench.reconciler_server import Writer, insert_sql

BATCH_PAYMENTS = 2_000
"""Payments per load transaction (about 2,100 events: a few multi-row INSERTs each)."""
OTHER_ZONES = ("America/New_York", "Europe/London", "Asia/Kolkata", "Australia/Sydney")


# -- the data set ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    events: int
    seed: int = 7
    days: int = 30
    refund_share: float = 0.05
    """Share of payments refunded at least once (version 2)."""
    second_refund_share: float = 0.2
    """Share of the refunded payments refunded a second time (version 3)."""
    big_merchant_share: float = 0.3
    usd_share: float = 0.05

    @property
    def merchants(self) -> int:
        return max(10, min(2_000, self.events // 500))

    @property
    def users(self) -> int:
        return max(10, self.events // 5)


@dataclass(slots=True)
class Planned:
    """A payment to load: its capture and its refunds (time, amount, reason)."""

    at: float
    merchant: str
    user: str
    method: str
    currency: str
    amount: int
    store_id: str | None
    order_ref: str | None
    metadata: dict[str, str]
    refunds: list[tuple[float, int, str | None]]
    ids: list[uuid.UUID] = field(default_factory=list)
    """payment_id, then the event_id of each version, then each refund's refund_id."""


def merchant_ids(shape: Shape) -> list[str]:
    return [f"m{i:05d}" for i in range(shape.merchants)]


def merchant_zones(shape: Shape) -> dict[str, str]:
    """Merchants with a row in ``merchants``: every tenth, in another zone (not the big one)."""
    ids = merchant_ids(shape)
    return {
        m: OTHER_ZONES[(i // 10) % len(OTHER_ZONES)] for i, m in enumerate(ids) if i and not i % 10
    }


def plan(shape: Shape, end: datetime) -> list[Planned]:
    """Exactly ``shape.events`` events' worth of payments, captures in time order."""
    rng = random.Random(shape.seed)
    merchants = merchant_ids(shape)
    # One merchant holds big_merchant_share of the payments; the rest follow a Zipf-like tail.
    tail = [1.0 / (rank**0.8) for rank in range(1, len(merchants))]
    scale = (1.0 - shape.big_merchant_share) / sum(tail)
    weights = [shape.big_merchant_share, *(w * scale for w in tail)]
    cumulative: list[float] = []
    running = 0.0
    for w in weights:
        running += w
        cumulative.append(running)
    end_s = end.timestamp()
    span = shape.days * 86_400.0
    per_payment = 1 + shape.refund_share * (1 + shape.second_refund_share)
    step = span / max(1.0, shape.events / per_payment)
    at = end_s - span
    planned: list[Planned] = []
    total = 0
    while total < shape.events:
        at = min(at + step * 2 * rng.random(), end_s)
        merchant = rng.choices(merchants, cum_weights=cumulative)[0]
        currency = "USD" if rng.random() < shape.usd_share else "JPY"
        amount = rng.randint(100, 50_000)
        refunds: list[tuple[float, int, str | None]] = []
        room = shape.events - total - 1
        if room > 0 and rng.random() < shape.refund_share:
            first = amount if rng.random() < 0.5 or amount < 2 else rng.randint(1, amount - 1)
            when = min(at + max(1.0, rng.expovariate(1 / 86_400)), end_s)
            refunds.append((when, first, rng.choice(("damaged", "cancelled", None))))
            left = amount - first
            if room > 1 and left > 0 and rng.random() < shape.second_refund_share:
                when = min(when + max(1.0, rng.expovariate(1 / 86_400)), end_s)
                refunds.append((when, rng.randint(1, left), None))
        n = len(planned)
        planned.append(
            Planned(
                at=at,
                merchant=merchant,
                user=f"u{rng.randrange(shape.users)}",
                method="card" if rng.random() < 0.4 else "balance",
                currency=currency,
                amount=amount,
                store_id=f"s{rng.randrange(20)}" if rng.random() < 0.5 else None,
                order_ref=f"order-{n}" if rng.random() < 0.7 else None,
                metadata={"campaign": "tv-2026"} if rng.random() < 0.1 else {},
                refunds=refunds,
            )
        )
        total += 1 + len(refunds)
    return planned


def assign_ids(planned: list[Planned]) -> None:
    """UUIDv7 ids from ``new_id`` in the order the events happened (event_id order is time
    order, as in production; payment ids follow capture order, so also primary-key order)."""
    timeline = [(p.at, i, 1) for i, p in enumerate(planned)]
    timeline += [
        (when, i, v) for i, p in enumerate(planned) for v, (when, _, _) in enumerate(p.refunds, 2)
    ]
    timeline.sort()
    for _, i, version in timeline:
        p = planned[i]
        if version == 1:
            p.ids.append(new_id())  # the payment id
        p.ids.append(new_id())  # the event id of this version
        if version > 1:
            p.ids.append(new_id())  # the refund id
    # ids as appended: payment, event v1, then (event, refund) per refund; make them indexable.
    for p in planned:
        payment_id, v1, rest = p.ids[0], p.ids[1], p.ids[2:]
        p.ids = [payment_id, v1, *rest[0::2], *rest[1::2]]


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


EVENT_COLUMNS = (
    "payment_id", "version", "event_id", "event_type", "schema_version", "merchant_id",
    "amount", "currency", "occurred_at", "recorded_at", "body",
)  # fmt: skip
PAYMENT_COLUMNS = (
    "payment_id", "merchant_id", "user_id", "store_id", "order_ref", "method", "currency",
    "captured_amount", "refunded_amount", "status", "version", "metadata", "created_at",
    "updated_at",
)  # fmt: skip
REFUND_COLUMNS = (
    "payment_id", "version", "refund_id", "merchant_id", "amount", "currency", "reason",
    "created_at",
)  # fmt: skip
TOTAL_COLUMNS = ("payments_count", "payments_amount", "refunds_count", "refunds_amount")


@dataclass(slots=True)
class Batch:
    events: list[tuple[Any, ...]] = field(default_factory=list)
    payments: list[tuple[Any, ...]] = field(default_factory=list)
    refunds: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True)
class Totals:
    daily: dict[tuple[str, date, str], list[int]] = field(default_factory=dict)
    hourly: dict[tuple[str, datetime, str], list[int]] = field(default_factory=dict)

    def add(self, merchant: str, local: datetime, currency: str, index: int, amount: int) -> None:
        hour = local.replace(minute=0, second=0, microsecond=0, tzinfo=None)
        for sums in (
            self.daily.setdefault((merchant, local.date(), currency), [0, 0, 0, 0]),
            self.hourly.setdefault((merchant, hour, currency), [0, 0, 0, 0]),
        ):
            sums[index] += 1
            sums[index + 1] += amount


def build(planned: Sequence[Planned], zone_of: Callable[[str], ZoneInfo], totals: Totals) -> Batch:
    """The rows of some payments on both sides, exactly as the command side and the projector
    would have written them; adds their totals to ``totals``."""
    batch = Batch()
    for p in planned:
        payment_id = p.ids[0]
        zone = zone_of(p.merchant)
        captured_at = _at(p.at)
        capture = PaymentCaptured(
            event_id=p.ids[1],
            payment_id=payment_id,
            version=1,
            merchant_id=p.merchant,
            occurred_at=captured_at,
            recorded_at=captured_at,
            payload=PaymentCapturedPayload(
                amount=p.amount,
                currency=p.currency,
                user_id=p.user,
                method="card" if p.method == "card" else "balance",
                store_id=p.store_id,
                order_ref=p.order_ref,
                metadata=p.metadata,
            ),
        )
        events: list[PaymentCaptured | PaymentRefunded] = [capture]
        state: PaymentState = apply(None, capture)
        totals.add(p.merchant, captured_at.astimezone(zone), p.currency, 0, p.amount)
        refunded = 0
        k = len(p.refunds)
        for n, (when, amount, reason) in enumerate(p.refunds):
            refunded += amount
            version = n + 2
            refund = PaymentRefunded(
                event_id=p.ids[version],
                payment_id=payment_id,
                version=version,
                merchant_id=p.merchant,
                occurred_at=_at(when),
                recorded_at=_at(when),
                payload=PaymentRefundedPayload(
                    refund_id=p.ids[2 + k + n],
                    amount=amount,
                    currency=p.currency,
                    refunded_amount=refunded,
                    reason=reason,
                ),
            )
            events.append(refund)
            state = apply(state, refund)
            totals.add(p.merchant, refund.occurred_at.astimezone(zone), p.currency, 2, amount)
            batch.refunds.append(
                (
                    payment_id.bytes, version, refund.payload.refund_id.bytes, p.merchant,
                    amount, p.currency, reason, _naive(refund.occurred_at),
                )
            )  # fmt: skip
        for e in events:
            batch.events.append(
                (
                    e.payment_id.bytes, e.version, e.event_id.bytes, e.event_type,
                    e.schema_version, e.merchant_id, e.payload.amount, e.payload.currency,
                    _naive(e.occurred_at), _naive(e.recorded_at), event_to_json(e).decode(),
                )
            )  # fmt: skip
        batch.payments.append(
            (
                payment_id.bytes, state.merchant_id, state.user_id, p.store_id, p.order_ref,
                state.method, state.currency, state.captured_amount, state.refunded_amount,
                state.status, state.version,
                orjson.dumps(p.metadata, option=orjson.OPT_SORT_KEYS).decode(),
                _naive(state.created_at), _naive(state.updated_at),
            )
        )  # fmt: skip
    return batch


def load(shape: Shape, stores: Stores, write_db: str, read_db: str, progress: Progress) -> int:
    """Load both databases; return the number of payments."""
    settings = Settings()
    default_zone = ZoneInfo(settings.default_merchant_time_zone)
    named = {m: ZoneInfo(z) for m, z in merchant_zones(shape).items()}

    def zone_of(merchant: str) -> ZoneInfo:
        return named.get(merchant, default_zone)

    task = progress.add_task("planning", total=None)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    planned = plan(shape, end)
    assign_ids(planned)
    progress.update(task, description="loading events", total=shape.events, completed=0)
    write, read = Writer(stores, write_db), Writer(stores, read_db)
    totals = Totals()
    p = stores.param
    events_sql = insert_sql("events", EVENT_COLUMNS, p)
    payments_sql = insert_sql("payments", PAYMENT_COLUMNS, p)
    refunds_sql = insert_sql("refunds", REFUND_COLUMNS, p)
    try:
        read.put(
            insert_sql("merchants", ("merchant_id", "time_zone"), p),
            sorted(merchant_zones(shape).items()),
        )
        for start in range(0, len(planned), BATCH_PAYMENTS):
            batch = build(planned[start : start + BATCH_PAYMENTS], zone_of, totals)
            write.put(events_sql, batch.events)
            read.put(payments_sql, batch.payments)
            read.put(refunds_sql, batch.refunds)
            progress.advance(task, len(batch.events))
        for table, bucket, sums in (
            ("merchant_daily_totals", "day", totals.daily),
            ("merchant_hourly_totals", "hour", totals.hourly),
        ):
            rows: list[tuple[Any, ...]] = [(*key, *values) for key, values in sorted(sums.items())]
            sql = insert_sql(table, ("merchant_id", bucket, "currency", *TOTAL_COLUMNS), p)
            for first in range(0, len(rows), 5_000):
                read.put(sql, rows[first : first + 5_000])
    finally:
        write.close()
        read.close()
    progress.remove_task(task)
    return len(planned)


# -- the watermark and the drift of the measured runs -------------------------------------------


def reset_watermark(read_url: str) -> None:
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE reconciler_state SET watermark = NULL")
    finally:
        engine.dispose()


def take_drift(read_url: str, count: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Delete ``count`` payment rows (and their refunds); return them, to put them back."""
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":  # no seeded RAND(): the same choice in Python
                every = [
                    row[0]
                    for row in conn.exec_driver_sql(
                        "SELECT payment_id FROM payments ORDER BY payment_id"
                    )
                ]
                ids = random.Random(seed).sample(every, min(count, len(every)))
                param = "?"
            else:
                ids = [
                    row[0]
                    for row in conn.exec_driver_sql(
                        f"SELECT payment_id FROM payments ORDER BY RAND({int(seed)})"
                        f" LIMIT {int(count)}"
                    )
                ]
                param = "%s"
            if not ids:
                return [], []
            marks = ", ".join([param] * len(ids))
            payments = list(
                conn.exec_driver_sql(
                    f"SELECT {', '.join(PAYMENT_COLUMNS)} FROM payments"
                    f" WHERE payment_id IN ({marks})",
                    tuple(ids),
                )
            )
            refunds = list(
                conn.exec_driver_sql(
                    f"SELECT {', '.join(REFUND_COLUMNS)} FROM refunds"
                    f" WHERE payment_id IN ({marks})",
                    tuple(ids),
                )
            )
            conn.exec_driver_sql(f"DELETE FROM refunds WHERE payment_id IN ({marks})", tuple(ids))
            conn.exec_driver_sql(f"DELETE FROM payments WHERE payment_id IN ({marks})", tuple(ids))
            return payments, refunds
    finally:
        engine.dispose()


def put_back(read_url: str, payments: list[Any], refunds: list[Any]) -> None:
    engine = sa.create_engine(read_url)
    try:
        with engine.begin() as conn:
            param = "?" if conn.dialect.name == "sqlite" else "%s"
            for table, columns, rows in (
                ("payments", PAYMENT_COLUMNS, payments),
                ("refunds", REFUND_COLUMNS, refunds),
            ):
                if rows:
                    conn.exec_driver_sql(
                        insert_sql(table, columns, param), [tuple(r) for r in rows]
                    )
    finally:
        engine.dispose()
