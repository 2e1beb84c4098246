"""What a write request becomes before it is recorded: a ``WriteCommand``, its policy, the
decision it makes, and its answer. ``command_service/handlers.py`` decides and records commands
(and re-exports these names); nothing here touches a database.

A command is decided against the state of what it touches, read by the batch it is recorded
in: a payment's (``payment_id``) and a wallet's (``wallet_of``) for the commands of payments,
refunds and top-ups, the registrations of a user (``registers``), or a campaign's
(``campaign_id``: its events folded, and what it has granted). Only commands that name a
campaign make a batch read the campaign tables: payments never do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson

from command_service.store import Event, Scope
from kessai.campaigns import AnyCampaignEvent, CampaignState, apply_campaign_event
from kessai.errors import ApiError
from kessai.ledger import PaymentState
from kessai.wallets import Wallet

Clock = Callable[[], datetime]
IdSource = Callable[[], uuid.UUID]


@dataclass(frozen=True, slots=True)
class WritePolicy:
    client_id: str
    idempotency_key: str
    retention: timedelta
    shards: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes
    replayed: bool


Result = Outcome | ApiError
"""A command's answer (new or replayed), or its refusal."""

Decision = tuple[int, dict[str, Any], list[Event]]
"""The answer to a request (status, body) and the events it appends."""


class Decide(Protocol):
    def __call__(
        self,
        state: PaymentState | None,
        wallet: Wallet | None,
        /,
        *,
        clock: Clock,
        ids: IdSource,
    ) -> Decision:
        """The answer to the command given its payment's folded state and the wallet it
        touches (``None`` if none), or ``ApiError``."""
        ...


@dataclass(frozen=True, slots=True)
class CampaignNow:
    """A campaign as a batch decides against it: its folded events (``None``: no such
    campaign yet) and what it has granted (``kessai.write_store.load_granted``), advanced by
    the events the batch decided so far."""

    campaign_id: str
    state: CampaignState | None
    granted: int

    def after(self, event: AnyCampaignEvent) -> CampaignNow:
        return replace(self, state=apply_campaign_event(self.state, event))


class DecideCampaign(Protocol):
    def __call__(self, campaign: CampaignNow, /, *, clock: Clock, ids: IdSource) -> Decision:
        """The answer to a command on ``campaign``, or ``ApiError``."""
        ...


def no_wallet(_state: PaymentState | None) -> str | None:
    """A command that touches no wallet (a card payment, a refund of one)."""
    return None


def decided_by_its_campaign(
    _state: PaymentState | None, _wallet: Wallet | None, *, clock: Clock, ids: IdSource
) -> Decision:
    """The ``decide`` of a campaign's command, which the batch never calls: it calls
    ``decide_campaign`` with the campaign instead."""
    raise TypeError("a campaign's command is decided by its decide_campaign")


@dataclass(frozen=True, slots=True)
class WriteCommand:
    """One write request, ready to be decided against the state of the payment it touches.

    ``decide`` touches no database and reads the time and new ids only from ``clock`` and
    ``ids``: given the folded state of ``payment_id`` (``None`` for a new payment, or a refund
    of a payment that does not exist) and the wallet of the user ``wallet_of(state)`` names
    (its running balance in the batch), it returns the answer and the events to append, or
    raises ``ApiError`` for a refusal. A campaign's command (``campaign_command``) is decided
    by ``decide_campaign`` instead, in the same way, given its campaign."""

    policy: WritePolicy
    request: dict[str, Any]
    request_json: str
    payment_id: uuid.UUID | None
    decide: Decide
    wallet_of: Callable[[PaymentState | None], str | None] = no_wallet
    """The user whose wallet the command moves money in, given its payment's state."""
    registers: str | None = None
    """The user the command registers: refused ``409 user_exists`` (before ``decide``) when
    the user is registered already, in the store or by an earlier command of its batch."""
    campaign_id: str | None = None
    """The campaign the command creates or changes: the batch reads it (``CampaignNow``)."""
    decide_campaign: DecideCampaign | None = None

    @property
    def scope(self) -> Scope:
        return (self.policy.client_id, self.policy.idempotency_key)


def campaign_command(
    policy: WritePolicy, request: dict[str, Any], campaign_id: str, decide: DecideCampaign
) -> WriteCommand:
    """A command decided against the campaign ``campaign_id`` (which may not exist yet)."""
    return WriteCommand(
        policy,
        request,
        canonical(request),
        None,
        decided_by_its_campaign,
        campaign_id=campaign_id,
        decide_campaign=decide,
    )


def canonical(request: dict[str, Any]) -> str:
    """The normalized request as stored with its idempotency record and compared on reuse."""
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS).decode()
