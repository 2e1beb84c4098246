"""Campaigns on the command API: the commands that create, change and stop one, and the
admin's view of a campaign as the write store holds it.

Each command is decided by ``kessai.campaigns`` (``decide_create``, ``decide_change``,
``decide_stop``) against the campaign as its batch reads it (``handlers.campaigns_named``: its
events folded, and what it has granted), and appends one event at the campaign's next version:
two admins changing one campaign at once collide on that version, and the one that loses is
decided again against the winner's change (``handlers.commit_batch`` owns the transaction, as
for every other write). A creation is version 1, so a second creation of one campaign id,
however it races, is refused by the key.

The view (``CampaignOut``) is what the changes are decided against: the rules with every
change applied, the status at the time of the answer, and what has been granted (the rewards
service writes ``campaign_budget``). The merchant-facing figures are the query API's.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from command_service.commands import (
    CampaignNow,
    Clock,
    Decision,
    IdSource,
    WriteCommand,
    WritePolicy,
    campaign_command,
)
from command_service.schemas import PrintableText
from kessai.campaigns import (
    AnyCampaignEvent,
    AnyRules,
    CampaignChange,
    CampaignRules,
    CampaignState,
    CampaignStatus,
    decide_change,
    decide_create,
    decide_stop,
)
from kessai.errors import ApiError
from kessai.write_store import load_campaigns, load_granted


class CampaignOut(BaseModel):
    """A campaign as the write store holds it."""

    campaign_id: str
    rules: CampaignRules = Field(description="As created, with every change applied.")
    status: CampaignStatus = Field(description="At `as_of`.")
    version: int = Field(description="Events of the campaign so far (1: only its creation).")
    created_at: datetime
    stopped_at: datetime | None
    exhausted_at: datetime | None
    granted: int = Field(description="Granted so far, net of take-backs, in minor units.")
    remaining: int = Field(description="`budget` minus `granted` (never below 0).")
    as_of: datetime = Field(description="When this answer was decided.")


class CampaignRecordedOut(CampaignOut):
    """A campaign after the event a request recorded."""

    event_id: uuid.UUID
    event_type: Literal["CampaignCreated", "CampaignChanged", "CampaignStopped"]
    actor: str = Field(description="Who recorded the event: the admin's API key id.")


class CampaignList(BaseModel):
    campaigns: list[CampaignOut]


class StopCampaign(BaseModel):
    """Stop a campaign from now on: nothing is granted for what happens at or after it."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, min_length=1, max_length=200, pattern=PrintableText)


def view(campaign_id: str, state: CampaignState, granted: int, now: datetime) -> dict[str, Any]:
    """The body of ``CampaignOut`` for ``state`` at ``now``."""
    return {
        "campaign_id": campaign_id,
        "rules": state.rules.model_dump(mode="json"),
        "status": state.status_at(now),
        "version": state.version,
        "created_at": _iso(state.created_at),
        "stopped_at": _iso(state.stopped_at),
        "exhausted_at": _iso(state.exhausted_at),
        "granted": granted,
        "remaining": max(state.rules.budget - granted, 0),
        "as_of": _iso(now),
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _recorded(campaign: CampaignNow, event: AnyCampaignEvent, now: datetime) -> dict[str, Any]:
    """The answer to a command that recorded ``event``: the campaign after it, and the event."""
    after = campaign.after(event)
    assert after.state is not None
    return {
        **view(campaign.campaign_id, after.state, campaign.granted, now),
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "actor": event.actor,
    }


def campaign_not_found(campaign_id: str) -> ApiError:
    return ApiError(
        404,
        "campaign_not_found",
        f"There is no campaign {campaign_id}.",
        {"campaign_id": campaign_id},
    )


def _existing(campaign: CampaignNow) -> CampaignState:
    if campaign.state is None:
        raise campaign_not_found(campaign.campaign_id)
    return campaign.state


def create_command(policy: WritePolicy, rules: AnyRules, *, actor: str) -> WriteCommand:
    """The creation of a campaign with ``rules``: ``CampaignCreated`` (version 1), answered
    201; ``409 campaign_exists`` if the campaign id is taken."""
    request = {"operation": "create_campaign", **rules.model_dump(mode="json")}

    def decide(campaign: CampaignNow, *, clock: Clock, ids: IdSource) -> Decision:
        if campaign.state is not None:
            raise ApiError(
                409,
                "campaign_exists",
                f"Campaign {campaign.campaign_id} exists already; change it with PATCH.",
                {
                    "campaign_id": campaign.campaign_id,
                    "created_at": _iso(campaign.state.created_at),
                },
            )
        now = clock()
        event = decide_create(rules, now=now, actor=actor, event_id=ids())
        return 201, _recorded(campaign, event, now), [event]

    return campaign_command(policy, request, rules.campaign_id, decide)


def change_command(
    policy: WritePolicy, campaign_id: str, change: CampaignChange, *, actor: str
) -> WriteCommand:
    """A later end and/or a higher budget: ``CampaignChanged``, answered 200 (refusals:
    ``kessai.campaigns.decide_change``, given what the campaign has granted)."""
    request = {
        "operation": "change_campaign",
        "campaign_id": campaign_id,
        **change.model_dump(mode="json"),
    }

    def decide(campaign: CampaignNow, *, clock: Clock, ids: IdSource) -> Decision:
        state = _existing(campaign)
        now = clock()
        event = decide_change(
            state, change, granted=campaign.granted, now=now, actor=actor, event_id=ids()
        )
        return 200, _recorded(campaign, event, now), [event]

    return campaign_command(policy, request, campaign_id, decide)


def stop_command(
    policy: WritePolicy, campaign_id: str, stop: StopCampaign, *, actor: str
) -> WriteCommand:
    """A stop from now on: ``CampaignStopped``, answered 200; ``409 campaign_not_active`` if
    it is stopped, ended or exhausted already."""
    request = {"operation": "stop_campaign", "campaign_id": campaign_id, "reason": stop.reason}

    def decide(campaign: CampaignNow, *, clock: Clock, ids: IdSource) -> Decision:
        state = _existing(campaign)
        now = clock()
        event = decide_stop(state, now=now, actor=actor, reason=stop.reason, event_id=ids())
        return 200, _recorded(campaign, event, now), [event]

    return campaign_command(policy, request, campaign_id, decide)


def read_campaigns(
    engine: Engine, campaign_ids: Collection[str] | None, now: datetime
) -> list[dict[str, Any]]:
    """The view of each campaign of ``campaign_ids`` that exists (every campaign: ``None``),
    in campaign id order, from one short read (no transaction is written)."""
    with engine.connect() as conn:
        states = load_campaigns(conn, campaign_ids)
        granted = load_granted(conn, states.keys())
    return [view(cid, state, granted[cid].amount, now) for cid, state in sorted(states.items())]
