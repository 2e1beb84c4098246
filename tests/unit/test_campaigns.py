"""A campaign's rules, events and the decisions that change it (kessai/campaigns.py): invalid
rules are a 422 naming the field, a campaign only ever ends later or gets a bigger budget, a
stopped one takes no change, every event survives its JSON form, and the fold is the state."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kessai.campaigns import (
    CAMPAIGN_EVENT_TYPES,
    MAX_BUDGET,
    AnyCampaignEvent,
    CampaignBudgetExhausted,
    CampaignChanged,
    CampaignCreated,
    CampaignState,
    CampaignStopped,
    CashbackRules,
    WelcomeBonusRules,
    apply_campaign_event,
    campaign_event_to_json,
    campaign_stream_id,
    decide_change,
    decide_create,
    decide_stop,
    fold_campaign,
    parse_campaign_event,
    parse_change,
    parse_rules,
)
from kessai.errors import ApiError
from kessai.events import wallet_stream_id
from kessai.grants import decide_exhausted
from kessai.ledger import InvariantViolation

START = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
ADMIN = "0123456789abcdef"

CASHBACK: dict[str, Any] = {
    "campaign_id": "autumn-20",
    "name": "20% back",
    "kind": "cashback",
    "currency": "JPY",
    "budget": 1_000_000,
    "starts_at": "2026-11-01T09:00:00+09:00",
    "ends_at": "2026-12-01T09:00:00+09:00",
    "rate_bp": 2000,
    "cap_per_payment": 1000,
    "cap_per_user_month": 5000,
}
WELCOME: dict[str, Any] = {
    "campaign_id": "welcome",
    "name": "ようこそ 500円",
    "kind": "welcome_bonus",
    "currency": "JPY",
    "budget": 10_000_000,
    "starts_at": "2026-11-01T00:00:00Z",
    "ends_at": "2026-12-01T00:00:00Z",
}


def refused(data: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as error:
        parse_rules(data)
    assert (error.value.status, error.value.code) == (422, "invalid_campaign")
    return error.value


def fields_named(error: ApiError) -> set[str]:
    return {e["field"] for e in error.details["errors"]}


def created(rules: dict[str, Any] = CASHBACK) -> CampaignState:
    return fold_campaign([decide_create(parse_rules(rules), now=START, actor=ADMIN)])


# -- rules ------------------------------------------------------------------------------------


def test_cashback_rules_take_their_defaults_and_keep_the_offsets_given() -> None:
    rules = parse_rules(CASHBACK)
    assert isinstance(rules, CashbackRules)
    assert rules.time_zone == "Asia/Tokyo"
    assert (rules.min_payment_amount, rules.methods, rules.merchants) == (
        0,
        ("balance", "card"),
        None,
    )
    assert rules.starts_at == START
    assert rules.starts_at.utcoffset() == timedelta(hours=9)


def test_a_jpy_welcome_bonus_is_500_yen_unless_it_says_otherwise() -> None:
    assert parse_rules(WELCOME) == WelcomeBonusRules.model_validate({**WELCOME, "amount": 500})
    assert isinstance(rules := parse_rules({**WELCOME, "amount": 1000}), WelcomeBonusRules)
    assert rules.amount == 1000
    assert fields_named(refused({**WELCOME, "currency": "USD"})) == {"amount"}


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"rate_bp": 10_001}, "rate_bp"),  # over 100%
        ({"rate_bp": 0}, "rate_bp"),
        ({"rate_bp": 20.0}, "rate_bp"),
        ({"ends_at": "2026-11-01T09:00:00+09:00"}, "ends_at"),  # at its start
        ({"ends_at": "2026-10-01T00:00:00Z"}, "ends_at"),  # before its start
        ({"starts_at": "2026-11-01T00:00:00"}, "starts_at"),  # no offset
        ({"starts_at": 0}, "starts_at"),  # a number is not an instant, whatever pydantic says
        ({"starts_at": "1700000000"}, "starts_at"),
        ({"starts_at": "2026-11-01"}, "starts_at"),  # a date: midnight where?
        ({"starts_at": "0001-01-01T00:00:00+14:00"}, "starts_at"),  # before 1970
        ({"ends_at": "9999-12-31T23:59:59-14:00"}, "ends_at"),  # after 9998
        ({"currency": "XXX"}, "currency"),
        ({"currency": "jpy"}, "currency"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"time_zone": "Asia"}, "time_zone"),  # a directory of the database, not a zone
        ({"time_zone": "../../etc/passwd"}, "time_zone"),
        ({"campaign_id": "autumn 20"}, "campaign_id"),
        ({"campaign_id": ""}, "campaign_id"),
        ({"campaign_id": "x" * 65}, "campaign_id"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "two\nlines"}, "name"),
        ({"name": "   "}, "name"),
        ({"budget": 0}, "budget"),
        ({"budget": MAX_BUDGET + 1}, "budget"),
        ({"budget": "1000"}, "budget"),
        ({"budget": True}, "budget"),
        ({"cap_per_payment": 0}, "cap_per_payment"),
        ({"cap_per_user_month": 0}, "cap_per_user_month"),
        ({"min_payment_amount": -1}, "min_payment_amount"),
        ({"methods": []}, "methods"),
        ({"methods": ["cash"]}, "methods.0"),
        ({"methods": ["card", "card"]}, "methods"),
        ({"merchants": []}, "merchants"),
        ({"merchants": ["m1", "m1"]}, "merchants"),
        ({"merchants": ["no spaces"]}, "merchants.0"),
        ({"amount": 500}, "amount"),  # a welcome bonus's field on a cashback campaign
        ({"kind": "lottery"}, "kind"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_cashback_rules_are_a_422_naming_the_field(bad: dict[str, Any], field: str) -> None:
    error = refused({**CASHBACK, **bad})
    assert fields_named(error) == {field}
    assert field in error.message


@pytest.mark.parametrize("field", ["rate_bp", "cap_per_payment", "methods", "merchants"])
def test_a_cashback_field_on_a_welcome_bonus_is_a_422_naming_it(field: str) -> None:
    error = refused({**WELCOME, field: CASHBACK.get(field, ["card"])})
    assert error.details["errors"] == [
        {
            "field": field,
            "message": "is not a field of this kind of campaign",
            "type": "extra_forbidden",
        }
    ]


@pytest.mark.parametrize("field", ["rate_bp", "cap_per_payment", "cap_per_user_month"])
def test_a_cashback_without_its_rate_or_caps_is_a_422_naming_what_is_missing(field: str) -> None:
    data = {k: v for k, v in CASHBACK.items() if k != field}
    assert fields_named(refused(data)) == {field}


def test_every_wrong_field_is_named_at_once() -> None:
    error = refused({**CASHBACK, "rate_bp": 0, "currency": "XXX", "budget": -1})
    assert fields_named(error) == {"rate_bp", "currency", "budget"}


@given(
    rate_bp=st.integers(1, 10_000),
    budget=st.integers(1, MAX_BUDGET),
    offset_minutes=st.integers(-14 * 60, 14 * 60),
    hours=st.integers(1, 24 * 365),
)
def test_any_valid_rules_survive_their_json_form(
    rate_bp: int, budget: int, offset_minutes: int, hours: int
) -> None:
    offset = timedelta(minutes=offset_minutes)
    start = START.astimezone(timezone(offset))
    data = {
        **CASHBACK,
        "rate_bp": rate_bp,
        "budget": budget,
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=hours)).isoformat(),
    }
    rules = parse_rules(data)
    again = parse_rules(json.loads(rules.model_dump_json()))
    assert again == rules
    assert again.starts_at.utcoffset() == offset


# -- events and the fold ----------------------------------------------------------------------


def every_event() -> list[AnyCampaignEvent]:
    state = created()
    change = decide_change(
        state,
        parse_change({"ends_at": "2026-12-15T00:00:00+09:00", "budget": 2_000_000}),
        granted=0,
        now=START + timedelta(days=1),
        actor=ADMIN,
    )
    state = apply_campaign_event(state, change)
    stop = decide_stop(state, now=START + timedelta(days=2), actor=ADMIN, reason="over")
    state = apply_campaign_event(state, stop)
    # A payment captured before the stop, granted after it, may still spend the budget.
    exhausted = decide_exhausted(
        state, granted=2_000_000, now=START + timedelta(days=3), actor="rewards"
    )
    assert exhausted is not None
    welcome = decide_create(parse_rules(WELCOME), now=START, actor=ADMIN)
    return [created_event(), change, stop, exhausted, welcome]


def created_event() -> CampaignCreated:
    return decide_create(parse_rules(CASHBACK), now=START, actor=ADMIN)


def test_every_kind_of_event_survives_its_json_form() -> None:
    events = every_event()
    assert sorted({e.event_type for e in events}) == sorted(CAMPAIGN_EVENT_TYPES)
    for event in events:
        again = parse_campaign_event(campaign_event_to_json(event))
        assert again == event
        assert type(again) is type(event)
        assert campaign_event_to_json(again) == campaign_event_to_json(event)


def test_the_fold_of_its_events_is_the_campaign_as_changed_stopped_and_exhausted() -> None:
    created_, change, stop, exhausted, _ = every_event()
    state = fold_campaign([created_, change, stop, exhausted])
    assert state.version == 4
    assert state.rules.ends_at == datetime(2026, 12, 15, tzinfo=UTC) - timedelta(hours=9)
    assert state.rules.budget == 2_000_000
    assert state.rules.rate_bp == 2000  # type: ignore[union-attr]
    assert (state.exhausted_at, state.stopped_at) == (exhausted.occurred_at, stop.occurred_at)
    assert state.status_at(START + timedelta(hours=1)) == "active"
    assert state.status_at(stop.occurred_at) == "stopped"
    assert state.status_at(exhausted.occurred_at) == "stopped"  # the stop came first


def test_the_status_follows_the_window() -> None:
    state = created()
    assert state.status_at(START - timedelta(microseconds=1)) == "scheduled"
    assert state.status_at(START) == "active"
    assert state.status_at(END - timedelta(microseconds=1)) == "active"
    assert state.status_at(END) == "ended"


def test_a_stream_with_a_gap_or_without_its_creation_does_not_fold() -> None:
    created_, change, _, exhausted, _ = every_event()
    with pytest.raises(InvariantViolation):
        fold_campaign([created_, exhausted])
    with pytest.raises(InvariantViolation):
        fold_campaign([change])
    with pytest.raises(InvariantViolation):
        fold_campaign([])


def test_a_creation_is_version_1_of_its_own_campaign() -> None:
    data = created_event().model_dump()
    with pytest.raises(ValueError, match="version 1"):
        CampaignCreated.model_validate({**data, "version": 2})
    with pytest.raises(ValueError, match="version 1"):
        CampaignCreated.model_validate({**data, "campaign_id": "another"})


def test_a_campaign_stream_has_an_id_of_its_own() -> None:
    assert campaign_stream_id("c1") == campaign_stream_id("c1") != campaign_stream_id("c2")
    assert campaign_stream_id("c1") != wallet_stream_id("c1")
    assert campaign_stream_id("c1").version == 8  # neither a payment's (7) nor a wallet's (5)
    assert campaign_stream_id("c1").variant == uuid.RFC_4122


# -- changes ----------------------------------------------------------------------------------

NOW = START + timedelta(days=1)


def change(
    data: dict[str, Any], state: CampaignState | None = None, granted: int = 0
) -> CampaignChanged:
    return decide_change(
        state or created(), parse_change(data), granted=granted, now=NOW, actor=ADMIN
    )


def refused_change(
    data: dict[str, Any], state: CampaignState | None = None, granted: int = 0
) -> ApiError:
    with pytest.raises(ApiError) as error:
        change(data, state, granted)
    assert error.value.status == 422
    return error.value


def test_a_later_end_and_a_higher_budget_are_a_change_by_its_actor() -> None:
    event = change({"ends_at": "2026-12-31T00:00:00Z", "budget": 3_000_000})
    assert (event.version, event.actor, event.occurred_at) == (2, ADMIN, NOW)
    assert event.payload.model_dump(exclude_none=True) == {
        "ends_at": datetime(2026, 12, 31, tzinfo=UTC),
        "budget": 3_000_000,
    }


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"ends_at": "2026-11-20T00:00:00Z"}, "ends_at"),  # earlier
        ({"ends_at": "2026-12-01T09:00:00+09:00"}, "ends_at"),  # the same instant
        ({"budget": 999_999}, "budget"),  # lower
        ({"budget": 1_000_000}, "budget"),  # the same
        ({"rate_bp": 3000}, "rate_bp"),  # anything else
        ({"starts_at": "2026-10-01T00:00:00Z"}, "starts_at"),
        ({"name": "renamed"}, "name"),
        ({}, "body"),  # nothing
    ],
)
def test_any_other_change_is_a_422_naming_the_field(data: dict[str, Any], field: str) -> None:
    error = refused_change(data)
    assert error.code == "invalid_campaign"
    assert fields_named(error) == {field}


def test_a_budget_below_what_is_granted_is_refused_with_both_numbers() -> None:
    error = refused_change({"budget": 1_500_000}, granted=1_600_000)
    assert error.code == "budget_below_granted"
    assert (error.details["budget"], error.details["granted"]) == (1_500_000, 1_600_000)
    assert fields_named(error) == {"budget"}


@pytest.mark.parametrize("data", [{"ends_at": "2027-01-01T00:00:00Z"}, {"budget": 5_000_000}])
def test_a_stopped_ended_or_exhausted_campaign_takes_no_change(data: dict[str, Any]) -> None:
    state = created()
    stopped = apply_campaign_event(
        state, decide_stop(state, now=NOW - timedelta(hours=1), actor=ADMIN)
    )
    ended = created({**CASHBACK, "ends_at": "2026-11-01T12:00:00Z"})
    exhausted_event = decide_exhausted(
        state, granted=1_000_000, now=NOW - timedelta(hours=1), actor="r"
    )
    assert exhausted_event is not None
    exhausted = apply_campaign_event(state, exhausted_event)
    for before, status in ((stopped, "stopped"), (ended, "ended"), (exhausted, "exhausted")):
        error = refused_change(data, before)
        assert (error.code, error.details["status"]) == ("invalid_campaign", status)
        assert fields_named(error) == set(data)


def test_a_stop_takes_effect_from_its_instant_and_only_once() -> None:
    state = created()
    stop = decide_stop(state, now=NOW, actor=ADMIN)
    assert isinstance(stop, CampaignStopped)
    state = apply_campaign_event(state, stop)
    assert state.status_at(NOW - timedelta(microseconds=1)) == "active"
    assert state.status_at(NOW) == "stopped"
    with pytest.raises(ApiError) as error:
        decide_stop(state, now=NOW + timedelta(seconds=1), actor=ADMIN)
    assert (error.value.status, error.value.code) == (409, "campaign_not_active")
    assert error.value.details == {"campaign_id": "autumn-20", "status": "stopped"}


def test_an_ended_campaign_cannot_be_stopped_but_one_not_started_can() -> None:
    with pytest.raises(ApiError) as error:
        decide_stop(created(), now=END, actor=ADMIN)
    assert error.value.details["status"] == "ended"
    stop = decide_stop(created(), now=START - timedelta(days=1), actor=ADMIN)
    assert fold_campaign([created_event(), stop]).status_at(START) == "stopped"


def test_exhaustion_is_recorded_once_when_the_budget_is_reached() -> None:
    state = created()
    assert decide_exhausted(state, granted=999_999, now=NOW, actor="rewards") is None
    event = decide_exhausted(state, granted=1_000_000, now=NOW, actor="rewards")
    assert isinstance(event, CampaignBudgetExhausted)
    assert (event.payload.granted, event.payload.budget, event.version) == (1_000_000, 1_000_000, 2)
    state = apply_campaign_event(state, event)
    assert decide_exhausted(state, granted=1_000_000, now=NOW, actor="rewards") is None


@given(
    steps=st.lists(
        st.tuples(st.integers(-5, 5), st.integers(-500_000, 500_000)), min_size=1, max_size=8
    )
)
def test_whatever_is_asked_the_end_only_moves_later_and_the_budget_only_up(
    steps: list[tuple[int, int]],
) -> None:
    events: list[AnyCampaignEvent] = [created_event()]
    for days, budget_delta in steps:
        state = fold_campaign(events)
        ask = {
            "ends_at": (state.rules.ends_at + timedelta(days=days)).isoformat(),
            "budget": max(1, state.rules.budget + budget_delta),
        }
        try:
            events.append(change(ask, state))
        except ApiError:
            continue
        after = fold_campaign(events)
        assert after.rules.ends_at > state.rules.ends_at
        assert after.rules.budget > state.rules.budget
    assert fold_campaign(events).version == len(events)


def test_event_ids_are_new_unless_given() -> None:
    given_id = uuid.UUID(int=7)
    assert decide_stop(created(), now=NOW, actor=ADMIN, event_id=given_id).event_id == given_id
    assert created_event().event_id != created_event().event_id
