"""The reconciler's pure parts, without I/O: the comparison of a payment, the local buckets of
the write store's sums, the cut of the totals, and which days a repair makes the run check."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from kessai.events import (
    PaymentCaptured,
    PaymentCapturedPayload,
    PaymentRefunded,
    PaymentRefundedPayload,
)
from kessai.ids import bound_at, new_id
from kessai.settings import Settings
from reconciler.buckets import ZERO, diff, expected_from
from reconciler.compare import Event, ReadPayment, compare
from reconciler.find import Start
from reconciler.loaders import OutboxView
from reconciler.records import Scope
from reconciler.repair import Repaired
from reconciler.sums import quarter_start
from reconciler.verify import _days_to_check, cut_of

KOLKATA, TOKYO = ZoneInfo("Asia/Kolkata"), ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 30, 4, 20, tzinfo=UTC)


def captured(pid: uuid.UUID, amount: int) -> PaymentCaptured:
    return PaymentCaptured(
        event_id=new_id(),
        payment_id=pid,
        version=1,
        merchant_id="m1",
        occurred_at=T0,
        recorded_at=T0,
        payload=PaymentCapturedPayload(
            amount=amount, currency="JPY", user_id="u1", method="balance"
        ),
    )


def refunded(pid: uuid.UUID, amount: int, total: int) -> PaymentRefunded:
    return PaymentRefunded(
        event_id=new_id(),
        payment_id=pid,
        version=2,
        merchant_id="m1",
        occurred_at=T0,
        recorded_at=T0,
        payload=PaymentRefundedPayload(
            refund_id=new_id(), amount=amount, currency="JPY", refunded_amount=total
        ),
    )


def test_a_row_behind_is_brought_forward_and_a_wrong_row_is_reset() -> None:
    pid = uuid.uuid4()
    events: list[Event] = [captured(pid, 1_000), refunded(pid, 300, 300)]
    right = ReadPayment("m1", 1_000, 300, 2, "partially_refunded", ((2, 300),))
    assert compare(pid, events, right) is None
    behind = ReadPayment("m1", 1_000, 0, 1, "captured", ())
    wrong = ReadPayment("m1", 1_000, 200, 2, "partially_refunded", ((2, 200),))
    found_behind, found_wrong = compare(pid, events, behind), compare(pid, events, wrong)
    assert found_behind is not None
    assert found_wrong is not None
    assert (found_behind.kind, (found_behind.details or {})["reset"]) == ("mismatch", False)
    assert (found_wrong.kind, (found_wrong.details or {})["reset"]) == ("mismatch", True)
    missing = compare(pid, events, None)
    assert missing is not None
    assert (missing.kind, missing.merchant_id) == ("missing", "m1")


def test_quarter_hours_land_in_the_merchants_local_hours() -> None:
    """UTC 04:15-04:30 is 09:45 in Kolkata, 04:30-04:45 is 10:00: one UTC hour, two local
    hours; in Tokyo both are 13:00."""
    q = int((T0 - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(minutes=15))
    assert quarter_start(q) == datetime(2026, 11, 30, 4, 15, tzinfo=UTC)
    grouped = [("m-kol", "JPY", q, 0, 1, 1_000), ("m-kol", "JPY", q + 1, 0, 1, 500)]
    grouped += [("m-tyo", "JPY", q, 0, 1, 1_000), ("m-tyo", "JPY", q + 1, 0, 1, 500)]
    expected = expected_from(grouped, {"m-kol": KOLKATA}, TOKYO)
    kol, tyo = expected.buckets["m-kol"], expected.buckets["m-tyo"]
    day = date(2026, 11, 30)
    assert kol.hourly == {
        (datetime(2026, 11, 30, 9), "JPY"): [1, 1_000, 0, 0],  # noqa: DTZ001 (local hours)
        (datetime(2026, 11, 30, 10), "JPY"): [1, 500, 0, 0],  # noqa: DTZ001
    }
    assert tyo.hourly == {(datetime(2026, 11, 30, 13), "JPY"): [2, 1_500, 0, 0]}  # noqa: DTZ001
    assert kol.daily == tyo.daily == {(day, "JPY"): [2, 1_500, 0, 0]}
    # Stored buckets that are all zero equal buckets that hold nothing.
    assert diff(kol.daily, {(day, "JPY"): (2, 1_500, 0, 0), (day, "USD"): ZERO}) == {}


def test_the_totals_cut_is_the_upper_bound_minus_the_margin_never_below_the_scope() -> None:
    settings = Settings().model_copy(update={"reconcile_safety_margin_seconds": 60.0})
    upper = bound_at(T0)
    assert cut_of(settings, None, upper) == bound_at(T0 - timedelta(seconds=60))
    lower = bound_at(T0 - timedelta(seconds=10))
    assert cut_of(settings, lower, upper) == lower


def test_a_repair_before_the_scope_is_checked_for_a_few_days_and_reported_for_the_rest() -> None:
    scope = Scope(after=datetime(2026, 11, 30, tzinfo=UTC))
    touched = {"m1": [datetime(2026, 11, d, 3, tzinfo=UTC) for d in range(1, 11)]}
    start = Start(
        outbox=OutboxView(set(), 0, None, None),
        upper=bound_at(T0),
        parked=[],
        letters=[],
        zones={},
        fallback=TOKYO,
    )
    extra, left = _days_to_check(scope, Repaired(findings=[], touched=touched), start)
    assert extra == {"m1": {date(2026, 11, d) for d in range(1, 8)}}
    assert left == {"m1": {date(2026, 11, d) for d in range(8, 11)}}
