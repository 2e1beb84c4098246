"""What a campaign grants (kessai/grants.py): the cashback of a payment within its rate and
caps and only inside the window, the month of the per-user cap in the campaign's time zone,
the take-backs of refunds that add up to the proportion, the welcome bonus, the budget's cut."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kessai.campaigns import (
    CampaignState,
    apply_campaign_event,
    decide_create,
    decide_stop,
    fold_campaign,
    parse_rules,
)
from kessai.grants import (
    Grant,
    Ineligible,
    NoGrant,
    PaymentFacts,
    cashback,
    cut_to_budget,
    month_of,
    take_back,
    welcome_bonus,
)

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
TOKYO = ZoneInfo("Asia/Tokyo")
RULES: dict[str, Any] = {
    "campaign_id": "autumn-20",
    "name": "20% back",
    "kind": "cashback",
    "currency": "JPY",
    "budget": 1_000_000_000,
    "starts_at": START.isoformat(),
    "ends_at": END.isoformat(),
    "rate_bp": 2000,
    "cap_per_payment": 1000,
    "cap_per_user_month": 5000,
    "min_payment_amount": 100,
    "methods": ["balance"],
    "merchants": ["m1", "m2"],
}


def campaign(**changes: Any) -> CampaignState:
    rules = parse_rules({**RULES, **changes})
    return fold_campaign([decide_create(rules, now=START, actor="admin")])


def welcome() -> CampaignState:
    common = ("campaign_id", "name", "currency", "budget", "starts_at", "ends_at")
    rules = parse_rules({key: RULES[key] for key in common} | {"kind": "welcome_bonus"})
    return fold_campaign([decide_create(rules, now=START, actor="admin")])


def payment(**changes: Any) -> PaymentFacts:
    facts: dict[str, Any] = {
        "payment_id": uuid.UUID(int=1),
        "user_id": "u1",
        "merchant_id": "m1",
        "method": "balance",
        "amount": 3000,
        "currency": "JPY",
        "captured_at": START + timedelta(days=3),
        **changes,
    }
    return PaymentFacts(**facts)


def reason(state: CampaignState, facts: PaymentFacts, granted_this_month: int = 0) -> Ineligible:
    result = cashback(state, facts, granted_this_month=granted_this_month)
    assert isinstance(result, NoGrant), result
    return result.reason


def granted(state: CampaignState, facts: PaymentFacts, granted_this_month: int = 0) -> Grant:
    result = cashback(state, facts, granted_this_month=granted_this_month)
    assert isinstance(result, Grant), result
    return result


# -- the cashback of one payment --------------------------------------------------------------


def test_twenty_percent_of_a_payment_is_granted_in_its_tokyo_month() -> None:
    grant = granted(campaign(), payment(amount=3000))
    assert (grant.amount, grant.uncapped, grant.capped_by) == (600, 600, None)
    assert (grant.campaign_id, grant.user_id, grant.currency, grant.month) == (
        "autumn-20",
        "u1",
        "JPY",
        "2026-11",
    )


def test_the_per_payment_cap_then_the_month_s_remainder_cut_the_cashback() -> None:
    state = campaign()
    big = granted(state, payment(amount=100_000))
    assert (big.amount, big.uncapped, big.capped_by) == (1000, 20_000, "payment")
    nearly_full = granted(state, payment(amount=100_000), granted_this_month=4_700)
    assert (nearly_full.amount, nearly_full.capped_by) == (300, "user_month")
    assert reason(state, payment(amount=100_000), granted_this_month=5000) == "month_cap_reached"
    assert reason(state, payment(amount=100_000), granted_this_month=9000) == "month_cap_reached"


def test_the_cashback_rounds_down_and_a_yen_short_of_one_is_nothing() -> None:
    state = campaign(min_payment_amount=0)
    assert granted(state, payment(amount=109)).amount == 21
    assert reason(state, payment(amount=4)) == Ineligible.ROUNDS_TO_ZERO
    assert granted(state, payment(amount=5)).amount == 1


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        ({"currency": "USD"}, Ineligible.CURRENCY),
        ({"method": "card"}, Ineligible.METHOD),
        ({"merchant_id": "m3"}, Ineligible.MERCHANT),
        ({"amount": 99}, Ineligible.BELOW_MINIMUM),
        ({"captured_at": START - timedelta(microseconds=1)}, Ineligible.NOT_STARTED),
        ({"captured_at": END}, Ineligible.ENDED),
    ],
)
def test_an_ineligible_payment_earns_nothing_and_says_why(facts: dict[str, Any], why: str) -> None:
    assert reason(campaign(), payment(**facts)) == why
    assert why in {r.value for r in Ineligible}  # what a log and a metric label carry


def test_the_minimum_amount_itself_is_eligible_and_merchants_none_means_all() -> None:
    assert granted(campaign(), payment(amount=100)).amount == 20
    assert granted(campaign(merchants=None), payment(merchant_id="m999")).amount == 600


def test_the_window_edges() -> None:
    state = campaign()
    assert granted(state, payment(captured_at=START)).amount == 600
    assert granted(state, payment(captured_at=END - timedelta(microseconds=1))).amount == 600
    assert reason(state, payment(captured_at=END)) == Ineligible.ENDED


def test_the_window_edges_hold_whatever_offset_the_instants_are_written_in() -> None:
    state = campaign(starts_at="2026-11-01T09:00:00+09:00", ends_at="2026-12-01T09:00:00+09:00")
    assert granted(state, payment(captured_at=START)).amount == 600
    last = END.astimezone(ZoneInfo("America/New_York")) - timedelta(microseconds=1)
    assert granted(state, payment(captured_at=last)).amount == 600
    assert reason(state, payment(captured_at=END.astimezone(TOKYO))) == Ineligible.ENDED


def test_nothing_is_granted_for_a_payment_at_or_after_a_stop() -> None:
    state = campaign()
    stop_at = START + timedelta(days=2)
    stopped = apply_campaign_event(state, decide_stop(state, now=stop_at, actor="admin"))
    before = granted(stopped, payment(captured_at=stop_at - timedelta(microseconds=1)))
    assert before.amount == 600  # captured while it ran, granted late: still earned
    assert reason(stopped, payment(captured_at=stop_at)) == Ineligible.STOPPED


def test_a_welcome_bonus_campaign_gives_no_cashback() -> None:
    assert reason(welcome(), payment()) == Ineligible.NOT_CASHBACK


def test_a_negative_month_so_far_is_a_bug_not_a_bigger_cap() -> None:
    with pytest.raises(ValueError, match="never negative"):
        cashback(campaign(), payment(), granted_this_month=-1)


@given(
    amount=st.integers(1, 10**12),
    rate_bp=st.integers(1, 10_000),
    cap_per_payment=st.integers(1, 10**6),
    cap_per_user_month=st.integers(1, 10**7),
    granted_this_month=st.integers(0, 2 * 10**7),
)
def test_the_cashback_never_exceeds_the_rate_the_payment_cap_nor_the_month_left(
    amount: int,
    rate_bp: int,
    cap_per_payment: int,
    cap_per_user_month: int,
    granted_this_month: int,
) -> None:
    state = campaign(
        rate_bp=rate_bp,
        cap_per_payment=cap_per_payment,
        cap_per_user_month=cap_per_user_month,
        min_payment_amount=0,
    )
    result = cashback(state, payment(amount=amount), granted_this_month=granted_this_month)
    month_left = max(0, cap_per_user_month - granted_this_month)
    expected = min(amount * rate_bp // 10_000, cap_per_payment, month_left)
    if isinstance(result, NoGrant):
        assert expected == 0
        assert result.reason in (Ineligible.MONTH_CAP_REACHED, Ineligible.ROUNDS_TO_ZERO)
        return
    assert 0 < result.amount == expected
    assert result.amount * 10_000 <= amount * rate_bp
    assert result.amount <= cap_per_payment
    assert result.amount <= month_left


# -- the month of the per-user cap ------------------------------------------------------------


def test_the_last_evening_of_november_in_utc_is_already_december_in_tokyo() -> None:
    instant = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    assert month_of(instant, TOKYO) == "2026-12"
    assert month_of(instant, ZoneInfo("UTC")) == "2026-11"
    assert month_of(instant - timedelta(microseconds=1), TOKYO) == "2026-11"


def test_the_grant_counts_against_the_month_of_the_campaign_s_zone() -> None:
    instant = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    wide = {"ends_at": "2027-01-01T00:00:00Z"}
    assert granted(campaign(**wide), payment(captured_at=instant)).month == "2026-12"
    assert granted(campaign(**wide, time_zone="UTC"), payment(captured_at=instant)).month == (
        "2026-11"
    )


def test_month_of_refuses_a_naive_instant() -> None:
    with pytest.raises(ValueError, match="aware"):
        month_of(datetime(2026, 11, 30, 15, 0), TOKYO)  # noqa: DTZ001


# -- the budget -------------------------------------------------------------------------------


def test_the_last_grant_is_cut_to_what_is_left_of_the_budget() -> None:
    assert cut_to_budget(600, 10_000) == (600, False)
    assert cut_to_budget(600, 600) == (600, False)
    assert cut_to_budget(600, 250) == (250, True)
    assert cut_to_budget(600, 0) == (0, True)
    assert cut_to_budget(600, -5) == (0, True)
    with pytest.raises(ValueError, match="positive"):
        cut_to_budget(0, 100)


# -- take-backs -------------------------------------------------------------------------------


def test_a_half_refund_takes_back_half_rounded_down_and_the_rest_takes_the_rest() -> None:
    assert take_back(999, 3000, 1500, 0) == 499
    assert take_back(999, 3000, 3000, 499) == 500


@given(
    data=st.data(),
    grant=st.integers(0, 10**6),
    payment_amount=st.integers(1, 10**12),
    full=st.booleans(),
)
def test_take_backs_over_any_refunds_add_up_to_the_proportion(
    data: st.DataObject, grant: int, payment_amount: int, full: bool
) -> None:
    cuts = data.draw(st.lists(st.integers(1, payment_amount), max_size=10), label="refunded")
    totals = sorted(set(cuts)) + ([payment_amount] if full else [])
    taken = 0
    for total in totals:
        step = take_back(grant, payment_amount, total, taken)
        assert step >= 0
        taken += step
        assert taken == grant * total // payment_amount
    if full:
        assert taken == grant


@pytest.mark.parametrize(
    "args",
    [
        (100, 3000, 3001, 0),  # more refunded than paid
        (100, 3000, -1, 0),
        (100, 3000, 1500, 51),  # more taken back than is due
        (100, 0, 0, 0),
        (-1, 3000, 1500, 0),
    ],
)
def test_an_impossible_take_back_is_a_bug_not_a_number(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        take_back(*args)


# -- the welcome bonus ------------------------------------------------------------------------


def test_a_user_registered_while_the_welcome_bonus_runs_gets_its_amount() -> None:
    state = welcome()
    assert welcome_bonus(state, START) == 500
    assert welcome_bonus(state, END - timedelta(microseconds=1)) == 500
    assert welcome_bonus(state, END) is None
    assert welcome_bonus(state, START - timedelta(microseconds=1)) is None
    stop_at = START + timedelta(days=1)
    stopped = apply_campaign_event(state, decide_stop(state, now=stop_at, actor="admin"))
    assert welcome_bonus(stopped, stop_at - timedelta(microseconds=1)) == 500
    assert welcome_bonus(stopped, stop_at) is None


def test_a_cashback_campaign_gives_no_welcome_bonus() -> None:
    assert welcome_bonus(campaign(), START + timedelta(days=1)) is None
