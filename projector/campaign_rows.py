"""What campaign events and grants do to the read model, without I/O.

A campaign is a stream of its own (``kessai/campaigns.py``), keyed by
``campaign_stream_id(campaign_id)`` (a UUID of version 8) on the payments' topic. The projector
applies its events by the same rules as a payment's or a wallet's: by stream id and version
(duplicates, gaps, ``blocked`` parking, dead letters), the next version through the one fold of
a campaign (``kessai.campaigns.apply_campaign_event``), into the campaign's row.

A grant (``RewardGranted``) is a wallet's event: it is applied as the wallet's movement
(``projector.wallet_rows``), and only then, in the same batch, adds to its campaign's figures
(``GrantDelta``: in all, and in the minute it happened). A take-back (``RewardTakenBack``, after
a refund) is applied the same way and takes what came back out of the amount granted (not out
of the count of grants): the figures are net of take-backs, as the write side's
``campaign_budget`` is, and as the postings to ``campaign:<id>`` are. A grant's (or a
take-back's) version is applied once and only once, and the figures are written in the
transaction that stores the batch's offsets: a redelivery or a replay is a duplicate of the
wallet's version and adds nothing, exactly as a payment adds to its merchant's totals once.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from kessai.campaigns import (
    AnyCampaignEvent,
    CampaignState,
    apply_campaign_event,
    campaign_stream_id,
    parse_rules,
)
from kessai.events import AnyEvent, RewardGranted, RewardTakenBack, stream_of
from kessai.ledger import InvariantViolation

StreamEvent = AnyEvent | AnyCampaignEvent
"""Every kind of event the payments' topic carries."""

_stream_event_adapter: TypeAdapter[StreamEvent] = TypeAdapter(
    Annotated[StreamEvent, Field(discriminator="event_type")]
)


def parse_stream_event(raw: bytes | str) -> StreamEvent:
    """A payment's, a wallet's, a registration's or a campaign's event from its JSON form, by
    its ``event_type`` (raises ``pydantic.ValidationError``)."""
    return _stream_event_adapter.validate_json(raw)


@functools.lru_cache(maxsize=1 << 12)
def _campaign_stream(campaign_id: str) -> uuid.UUID:
    return campaign_stream_id(campaign_id)


def stream_id_of(event: StreamEvent) -> uuid.UUID:
    """The id of the event's stream: its Kafka key (``kessai.events.stream_of``, and a
    campaign's ``campaign_stream_id``)."""
    if isinstance(event, AnyCampaignEvent):
        return _campaign_stream(event.campaign_id)
    return stream_of(event)


@dataclass(frozen=True, slots=True)
class CampaignRow:
    """A campaign as the read model stores it: the fold of its events so far."""

    state: CampaignState
    stream_id: uuid.UUID
    updated_at: datetime
    """When its newest event happened."""


def apply_campaign(row: CampaignRow | None, event: AnyCampaignEvent) -> CampaignRow:
    """The campaign after ``event`` (``InvariantViolation`` if it cannot follow: not the next
    version, an event before the creation, a change that breaks the rules)."""
    try:
        state = apply_campaign_event(row.state if row is not None else None, event)
    except ValidationError as exc:  # a change the rules refuse (an end before the start)
        why = exc.errors()[0]["msg"]
        raise InvariantViolation(f"campaign {event.campaign_id}: {why}") from None
    return CampaignRow(
        state=state,
        stream_id=row.stream_id if row is not None else _campaign_stream(event.campaign_id),
        updated_at=event.occurred_at,
    )


def campaign_row_of(stored: Any) -> CampaignRow:
    """A ``campaigns`` row read back (the rules are stored as the fold left them)."""
    return CampaignRow(
        state=CampaignState(
            rules=parse_rules(orjson.loads(stored.rules)),
            version=stored.version,
            created_at=stored.created_at,
            stopped_at=stored.stopped_at,
            exhausted_at=stored.exhausted_at,
        ),
        stream_id=stored.stream_id,
        updated_at=stored.updated_at,
    )


def campaign_values(row: CampaignRow) -> tuple[Any, ...]:
    """The row's values in the ``campaigns`` table's column order."""
    s, rules = row.state, row.state.rules
    return (
        s.campaign_id, row.stream_id, rules.kind, rules.name, rules.currency, rules.budget,
        rules.starts_at, rules.ends_at, rules.time_zone, rules.model_dump_json(), s.created_at,
        s.stopped_at, s.exhausted_at, s.version, row.updated_at,
    )  # fmt: skip


@dataclass(slots=True)
class GrantDelta:
    """What a batch's grants (less its take-backs) add to one campaign's figures (in all, or
    in one minute)."""

    granted_amount: int = 0
    grants_count: int = 0

    def add(self, amount: int) -> None:
        self.granted_amount += amount
        self.grants_count += 1

    def take_back(self, amount: int) -> None:
        self.granted_amount -= amount


def minute_of(at: datetime) -> datetime:
    """The start of the minute (UTC) ``at`` is in: the bucket of the last hour's figures."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def count_grant(
    totals: dict[str, GrantDelta],
    minutes: dict[tuple[str, datetime], GrantDelta],
    grant: RewardGranted | RewardTakenBack,
) -> None:
    """Add ``grant`` (take out a take-back) to its campaign's figures of the batch: in all,
    and in its minute."""
    campaign_id, amount = grant.payload.campaign_id, grant.payload.amount
    for delta in (
        totals.setdefault(campaign_id, GrantDelta()),
        minutes.setdefault((campaign_id, minute_of(grant.occurred_at)), GrantDelta()),
    ):
        if isinstance(grant, RewardGranted):
            delta.add(amount)
        else:
            delta.take_back(amount)
