"""Campaigns: their rules, their events and the decisions that change them, without I/O.

A campaign gives money from its budget (the account ``campaign:<id>``) to users: a share of
their captured payments (``cashback``) or a fixed amount when they register
(``welcome_bonus``), between ``starts_at`` and ``ends_at``, until the budget is spent. What one
payment or registration earns is ``kessai/grants.py``.

A campaign is a stream of events, never a row updated in place: ``CampaignCreated`` (the rules),
``CampaignChanged`` (a later end, a higher budget: nothing else may change, so a grant decided
under the old rules stays right under the new ones), ``CampaignStopped`` (from then on nothing
is granted) and ``CampaignBudgetExhausted`` (the budget is spent: nothing more is granted,
and a later budget raise does not reopen it). ``fold_campaign`` is the one definition of a
campaign's state; ``decide_create``, ``decide_change``, ``decide_stop`` (and
``kessai.grants.decide_exhausted``) decide against it the event to append, as
``kessai/wallets.py`` decides a wallet's movements. The write path appends it at the next
version, so two admins deciding against one state collide on that version and one decides
again.

Invalid input is ``422 invalid_campaign`` whose ``details.errors`` name the fields, in the
shape the APIs give their own validation errors (``kessai/errors.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal, Self, get_args
from zoneinfo import ZoneInfo, available_timezones

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kessai.errors import ApiError
from kessai.events import SCHEMA_VERSION, CurrencyCode, MerchantId, PaymentMethod
from kessai.ids import new_id
from kessai.instants import Instant
from kessai.ledger import InvariantViolation
from kessai.money import MAX_AMOUNT, is_known_currency

MAX_BUDGET = MAX_AMOUNT * 1000
"""The largest budget of one campaign, in minor units (10^15: ten trillion yen)."""
MAX_MERCHANTS = 1000
"""The most merchants one campaign may name (more is a campaign for all of them)."""
DEFAULT_TIME_ZONE = "Asia/Tokyo"
WELCOME_BONUS_JPY = 500
"""A welcome bonus's amount when a JPY campaign names none."""

CampaignStatus = Literal["scheduled", "active", "stopped", "ended", "exhausted"]
CampaignId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""The pattern of a merchant id, so ``campaign:<id>`` is an account name."""
Actor = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,64}$")]
"""Who recorded an event: the API key's id of an admin, or the service (``rewards``)."""


def _printable_name(name: str) -> str:
    if not name.isprintable() or not name.strip():
        raise ValueError("a name is printable characters, not only spaces")
    return name


def _known_currency(code: str) -> str:
    if not is_known_currency(code):
        raise ValueError(f"{code} is not an active ISO 4217 currency")
    return code


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _known_zone(name: str) -> str:
    # Membership rather than trying ``ZoneInfo(name)``, which opens whatever file the name
    # leads to (a directory, ``zone.tab``) and fails in as many ways.
    if name not in _zones():
        raise ValueError(f"{name!r} is not an IANA time zone")
    return name


def _distinct(items: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(items)) != len(items):
        raise ValueError("lists each item once")
    return items


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable_name)]
Currency = Annotated[CurrencyCode, AfterValidator(_known_currency)]
TimeZone = Annotated[str, Field(max_length=64), AfterValidator(_known_zone)]
Budget = Annotated[int, Field(gt=0, le=MAX_BUDGET, strict=True)]
Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT, strict=True)]
Methods = Annotated[
    tuple[PaymentMethod, ...], Field(min_length=1, max_length=2), AfterValidator(_distinct)
]
Merchants = Annotated[
    tuple[MerchantId, ...],
    Field(min_length=1, max_length=MAX_MERCHANTS),
    AfterValidator(_distinct),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _field_error(field: str, message: str, error_type: str = "value_error") -> dict[str, str]:
    return {"field": field, "message": message, "type": error_type}


class _Rules(_Frozen):
    campaign_id: CampaignId
    name: Name
    currency: Currency
    budget: Budget
    """The most the campaign ever grants, in minor units: a hard limit."""
    starts_at: Instant
    """The first instant a payment (or registration) earns; any offset, kept as given."""
    ends_at: Instant
    """The first instant that earns nothing: the window is ``[starts_at, ends_at)``."""
    time_zone: TimeZone = DEFAULT_TIME_ZONE
    """Whose calendar months the per-user cap counts (``kessai.grants.month_of``)."""

    @model_validator(mode="after")
    def _ends_after_it_starts(self) -> Self:
        if self.ends_at <= self.starts_at:
            raise PydanticCustomError(
                "invalid_campaign", "must be after starts_at", {"field": "ends_at"}
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)


class CashbackRules(_Rules):
    """A share of each eligible captured payment, within caps."""

    kind: Literal["cashback"] = "cashback"
    rate_bp: Annotated[int, Field(ge=1, le=10_000, strict=True)]
    """Basis points of the payment's amount: 2000 = 20%, 10000 = all of it."""
    cap_per_payment: Amount
    cap_per_user_month: Budget
    """The most one user earns in one calendar month of ``time_zone``."""
    min_payment_amount: Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)] = 0
    methods: Methods = ("balance", "card")
    merchants: Merchants | None = None
    """``None``: every merchant."""


class WelcomeBonusRules(_Rules):
    """A fixed amount to each user who registers within the window."""

    kind: Literal["welcome_bonus"] = "welcome_bonus"
    amount: Amount

    @model_validator(mode="before")
    @classmethod
    def _500_yen_unless_said(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("amount") is None and data.get("currency") == "JPY":
            return {**data, "amount": WELCOME_BONUS_JPY}
        return data


CampaignRules = Annotated[CashbackRules | WelcomeBonusRules, Field(discriminator="kind")]
AnyRules = CashbackRules | WelcomeBonusRules
_rules_adapter: TypeAdapter[AnyRules] = TypeAdapter(CampaignRules)
_KINDS = ("cashback", "welcome_bonus")
"""The kinds of campaign: the tags of ``CampaignRules``."""


def _errors_of(error: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as the APIs name them: the field's dotted path (without the union's
    tag), what is wrong with it, and pydantic's type of error."""
    found = []
    for e in error.errors():
        loc = [str(part) for part in e["loc"]]
        if loc and loc[0] in _KINDS:
            loc = loc[1:]
        message, kind = str(e["msg"]), str(e["type"])
        ctx = e.get("ctx") or {}
        if kind.startswith("union_tag"):
            loc, message = ["kind"], f"must be one of {', '.join(_KINDS)}"
        elif kind == "extra_forbidden":
            message = "is not a field of this kind of campaign" if len(loc) == 1 else message
        elif not loc and "field" in ctx:
            loc = [str(ctx["field"])]
        found.append(_field_error(".".join(loc), message, kind))
    # A list with a wrong item is also too short "after validation": name only the item.
    return [e for e in found if not any(f["field"].startswith(e["field"] + ".") for f in found)]


def invalid_campaign(errors: list[dict[str, str]], **numbers: Any) -> ApiError:
    """``422 invalid_campaign`` naming each field in ``errors`` (``field``, ``message``,
    ``type``)."""
    return ApiError(
        422,
        "invalid_campaign",
        "The campaign is not valid: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors),
        {"errors": errors, **numbers},
    )


def parse_rules(data: Mapping[str, Any]) -> AnyRules:
    """A campaign's rules from a request's JSON object (offsets in its times are kept); ``422
    invalid_campaign`` naming the fields that are wrong."""
    try:
        return _rules_adapter.validate_python(dict(data))
    except ValidationError as error:
        raise invalid_campaign(_errors_of(error)) from None


# -- events -----------------------------------------------------------------------------------

CAMPAIGN_NAMESPACE = uuid.UUID("0193a6c1-5e7a-7b3c-9d2e-6b61c0ffee02")
"""The namespace of campaigns' stream ids (``campaign_stream_id``)."""


def campaign_stream_id(campaign_id: str) -> uuid.UUID:
    """The id of a campaign's stream, the same everywhere: a UUIDv5 of its own namespace with
    its version set to 8 (RFC 9562's custom), so no reader takes it for a payment's (7) or a
    wallet's (5; ``reconciler.wallets.is_wallet_stream`` tells them apart so)."""
    name_based = uuid.uuid5(CAMPAIGN_NAMESPACE, f"campaign:{campaign_id}").int
    return uuid.UUID(int=name_based & ~(0xF << 76) | 8 << 76)


class _CampaignEnvelope(_Frozen):
    event_id: uuid.UUID
    schema_version: int = Field(SCHEMA_VERSION, ge=2)
    campaign_id: CampaignId
    version: int = Field(ge=1)
    """Position of this event in the campaign's stream: 1 (its creation), 2, ... without gaps."""
    occurred_at: AwareDatetime
    """When it took effect: a stop from this instant on, an exhaustion from this instant on."""
    recorded_at: AwareDatetime
    actor: Actor
    # No postings: a campaign event moves no money. Grants (and the budget's funding, if it is
    # posted) are ledger events of their own.


class CampaignCreated(_CampaignEnvelope):
    event_type: Literal["CampaignCreated"] = "CampaignCreated"
    payload: CampaignRules

    @model_validator(mode="after")
    def _is_the_first_event_of_its_campaign(self) -> Self:
        if self.version != 1 or self.payload.campaign_id != self.campaign_id:
            raise ValueError("a campaign is created by version 1 of its own stream")
        return self


class CampaignChange(_Frozen):
    """What a change may set: a later end, a higher budget, or both."""

    ends_at: Instant | None = Field(None, exclude_if=lambda value: value is None)
    budget: Budget | None = Field(None, exclude_if=lambda value: value is None)

    @model_validator(mode="after")
    def _changes_something(self) -> Self:
        if self.ends_at is None and self.budget is None:
            raise PydanticCustomError(
                "nothing_to_change", "a change sets ends_at, budget or both", {"field": "body"}
            )
        return self


class CampaignChanged(_CampaignEnvelope):
    event_type: Literal["CampaignChanged"] = "CampaignChanged"
    payload: CampaignChange


class CampaignStoppedPayload(_Frozen):
    reason: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class CampaignStopped(_CampaignEnvelope):
    event_type: Literal["CampaignStopped"] = "CampaignStopped"
    payload: CampaignStoppedPayload = CampaignStoppedPayload()


class CampaignBudgetExhaustedPayload(_Frozen):
    granted: Annotated[int, Field(ge=0, le=MAX_BUDGET, strict=True)]
    """What was granted when the budget ran out (the budget, unless take-backs returned some)."""
    budget: Budget


class CampaignBudgetExhausted(_CampaignEnvelope):
    event_type: Literal["CampaignBudgetExhausted"] = "CampaignBudgetExhausted"
    payload: CampaignBudgetExhaustedPayload


AnyCampaignEvent = CampaignCreated | CampaignChanged | CampaignStopped | CampaignBudgetExhausted
CampaignEvent = Annotated[AnyCampaignEvent, Field(discriminator="event_type")]
CAMPAIGN_EVENT_TYPES: tuple[str, ...] = tuple(t.__name__ for t in get_args(AnyCampaignEvent))
_event_adapter: TypeAdapter[AnyCampaignEvent] = TypeAdapter(CampaignEvent)


def parse_campaign_event(raw: bytes | str) -> AnyCampaignEvent:
    """Parse a campaign event from its JSON form (raises ``pydantic.ValidationError``)."""
    return _event_adapter.validate_json(raw)


def campaign_event_to_json(event: AnyCampaignEvent) -> bytes:
    """The canonical JSON form, as the write store keeps it."""
    return event.model_dump_json().encode()


def parse_change(data: Mapping[str, Any]) -> CampaignChange:
    """A change from a request's JSON object; ``422 invalid_campaign`` naming a field that
    cannot change (anything but ``ends_at`` and ``budget``) or is not valid."""
    try:
        return CampaignChange.model_validate(dict(data))
    except ValidationError as error:
        errors = _errors_of(error)
        for e in errors:
            if e["type"] == "extra_forbidden":
                e["message"] = "cannot change: only ends_at and budget can"
        raise invalid_campaign(errors) from None


# -- the fold ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CampaignState:
    rules: AnyRules
    """As created, with every change applied."""
    version: int
    """Events so far: the next one is ``version + 1``."""
    created_at: datetime
    stopped_at: datetime | None = None
    exhausted_at: datetime | None = None

    @property
    def campaign_id(self) -> str:
        return self.rules.campaign_id

    def status_at(self, instant: datetime) -> CampaignStatus:
        """Stopped or exhausted from the instant it was; otherwise by the window."""
        if self.stopped_at is not None and instant >= self.stopped_at:
            return "stopped"
        if self.exhausted_at is not None and instant >= self.exhausted_at:
            return "exhausted"
        if instant >= self.rules.ends_at:
            return "ended"
        if instant < self.rules.starts_at:
            return "scheduled"
        return "active"


def apply_campaign_event(state: CampaignState | None, event: AnyCampaignEvent) -> CampaignState:
    """``state`` after ``event``; ``InvariantViolation`` if it cannot follow (a gap, another
    campaign, a creation that is not first)."""
    expected = 1 if state is None else state.version + 1
    if event.version != expected:
        raise InvariantViolation(
            f"campaign {event.campaign_id}: event {event.version} does not follow {expected - 1}"
        )
    if isinstance(event, CampaignCreated):
        return CampaignState(rules=event.payload, version=1, created_at=event.occurred_at)
    if state is None:
        raise InvariantViolation(f"campaign {event.campaign_id}: {event.event_type} before created")
    if event.campaign_id != state.campaign_id:
        raise InvariantViolation(f"campaign {state.campaign_id}: an event of {event.campaign_id}")
    state = replace(state, version=event.version)
    if isinstance(event, CampaignChanged):
        changes = event.payload.model_dump(exclude_none=True)
        rules = _rules_adapter.validate_python({**state.rules.model_dump(), **changes})
        return replace(state, rules=rules)
    if isinstance(event, CampaignStopped):
        return replace(state, stopped_at=state.stopped_at or event.occurred_at)
    return replace(state, exhausted_at=state.exhausted_at or event.occurred_at)


def fold_campaign(events: Iterable[AnyCampaignEvent]) -> CampaignState:
    """The campaign after ``events`` (in version order, starting with its creation)."""
    state: CampaignState | None = None
    for event in events:
        state = apply_campaign_event(state, event)
    if state is None:
        raise InvariantViolation("a campaign without events")
    return state


# -- decisions --------------------------------------------------------------------------------


def envelope(
    campaign_id: str, version: int, *, now: datetime, actor: str, event_id: uuid.UUID | None
) -> dict[str, Any]:
    """The envelope of an event decided at ``now``, recorded at ``now`` (the write path's
    clock) as ``version`` of the campaign's stream."""
    return {
        "event_id": event_id or new_id(),
        "campaign_id": campaign_id,
        "version": version,
        "occurred_at": now,
        "recorded_at": now,
        "actor": actor,
    }


def decide_create(
    rules: AnyRules, *, now: datetime, actor: str, event_id: uuid.UUID | None = None
) -> CampaignCreated:
    """The creation of a campaign with ``rules`` (a campaign that already exists is the write
    store's to refuse: its version 1 is taken)."""
    at = envelope(rules.campaign_id, 1, now=now, actor=actor, event_id=event_id)
    return CampaignCreated(**at, payload=rules)


def _not_changeable(state: CampaignState, change: CampaignChange, now: datetime) -> ApiError:
    status = state.status_at(now)
    fields = [f for f in ("ends_at", "budget") if getattr(change, f) is not None]
    return invalid_campaign(
        [
            _field_error(f, f"cannot change: the campaign is {status}", f"campaign_{status}")
            for f in fields
        ],
        status=status,
    )


def decide_change(
    state: CampaignState,
    change: CampaignChange,
    *,
    granted: int,
    now: datetime,
    actor: str,
    event_id: uuid.UUID | None = None,
) -> CampaignChanged:
    """``change`` as the event to append, if the campaign may take it: not stopped, ended or
    exhausted at ``now``; ``ends_at`` later than now's; ``budget`` higher than now's and not
    below ``granted`` (what the campaign has granted so far, net of take-backs: ``422
    budget_below_granted`` with both numbers). Otherwise ``422 invalid_campaign`` naming the
    field."""
    if state.status_at(now) not in ("scheduled", "active"):
        raise _not_changeable(state, change, now)
    rules = state.rules
    if change.budget is not None and change.budget < granted:
        numbers = {"budget": change.budget, "granted": granted}
        error = _field_error("budget", f"is below the {granted} already granted", "below_granted")
        raise ApiError(
            422, "budget_below_granted", error["message"], {"errors": [error], **numbers}
        )
    errors = []
    if change.ends_at is not None and change.ends_at <= rules.ends_at:
        errors.append(
            _field_error("ends_at", f"must be later than {rules.ends_at.isoformat()}", "earlier")
        )
    if change.budget is not None and change.budget <= rules.budget:
        errors.append(_field_error("budget", f"must be higher than {rules.budget}", "lower"))
    if errors:
        raise invalid_campaign(errors)
    at = envelope(state.campaign_id, state.version + 1, now=now, actor=actor, event_id=event_id)
    return CampaignChanged(**at, payload=change)


def decide_stop(
    state: CampaignState,
    *,
    now: datetime,
    actor: str,
    reason: str | None = None,
    event_id: uuid.UUID | None = None,
) -> CampaignStopped:
    """A stop from ``now`` on: nothing is granted for what happens at or after it. ``409
    campaign_not_active`` if it is already stopped, ended or exhausted (a campaign not yet
    started may be stopped: it never starts)."""
    status = state.status_at(now)
    if status not in ("scheduled", "active"):
        raise ApiError(
            409,
            "campaign_not_active",
            f"Campaign {state.campaign_id} is {status}: there is nothing to stop.",
            {"campaign_id": state.campaign_id, "status": status},
        )
    at = envelope(state.campaign_id, state.version + 1, now=now, actor=actor, event_id=event_id)
    return CampaignStopped(**at, payload=CampaignStoppedPayload(reason=reason))
