"""``GET /v1/admin/campaigns`` and ``GET /v1/admin/campaigns/{campaign_id}`` (scope ``admin``):
each campaign's rules and status, and what it has granted, from the tables the projector keeps
(``campaigns``; ``campaign_totals`` and ``campaign_minute_totals``, written in the transaction
that applies the grants).

One read view, top to bottom: the routes; the read (``read_campaigns``, in a worker thread,
inside one read-only transaction it owns, so a campaign and its figures are of one snapshot);
its SQL (the campaigns by their primary key, their totals by theirs, and the last hour as one
range of ``campaign_minute_totals``' primary key ``(campaign_id, minute)`` per campaign); and
the answer (``campaign_body``: the status as of the answer, what is left, and when it runs out
at the last hour's rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Path, Query
from sqlalchemy.engine import Engine
from starlette.responses import Response

from kessai.campaigns import CampaignState, parse_rules
from kessai.clock import utcnow
from kessai.errors import ApiError, ErrorOut
from kessai.schema.read import campaign_minute_totals, campaign_totals, campaigns
from query_service.routes.dependencies import (
    ADMIN_ROUTE,
    DATA_ERRORS,
    DEFAULT_PAGE_SIZE,
    FORBIDDEN,
    ID_PATTERN,
    LimitQuery,
    ResourcesDep,
    data_response,
)
from query_service.schemas import CampaignDetailOut, CampaignPageOut

LAST_HOUR = timedelta(hours=1)
COMMON_RULES = frozenset(
    ("campaign_id", "name", "kind", "currency", "budget", "starts_at", "ends_at", "time_zone")
)
"""The rules every kind of campaign has: answered beside ``rules``, not in it."""

CampaignIdPath = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=ID_PATTERN, description="1-64 of [A-Za-z0-9_-]."),
]
AfterQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=64,
        pattern=ID_PATTERN,
        description="`next_after` of the previous page; omit for the first.",
    ),
]
NOT_FOUND = {"model": ErrorOut, "description": "`campaign_not_found`: no such campaign."}

router = APIRouter()


@router.get(
    "/v1/admin/campaigns",
    response_model=CampaignPageOut,
    responses={**DATA_ERRORS, 403: FORBIDDEN},
    summary="Campaigns, their status and what they have granted",
    operation_id="list_campaigns",
    **ADMIN_ROUTE,
)
async def list_campaigns(
    *, resources: ResourcesDep, limit: LimitQuery = DEFAULT_PAGE_SIZE, after: AfterQuery = None
) -> Response:
    """Every campaign the read side knows, by `campaign_id`, each as
    `GET /v1/admin/campaigns/{campaign_id}` answers it; paged by keyset on the id (pass
    `next_after` as `after` until it is null). Needs the `admin` scope."""
    as_of = await resources.freshness.as_of()
    now = utcnow()
    items = await resources.run(
        lambda: read_campaigns(engine=resources.engine, now=now, after=after, limit=limit + 1)
    )
    more = len(items) > limit
    items = items[:limit]
    next_after = items[-1]["campaign_id"] if more and items else None
    return data_response({"items": items, "next_after": next_after}, as_of)


@router.get(
    "/v1/admin/campaigns/{campaign_id}",
    response_model=CampaignDetailOut,
    responses={**DATA_ERRORS, 403: FORBIDDEN, 404: NOT_FOUND},
    summary="A campaign: its rules, status, budget and what it has granted",
    operation_id="get_campaign",
    **ADMIN_ROUTE,
)
async def get_campaign(*, campaign_id: CampaignIdPath, resources: ResourcesDep) -> Response:
    """A campaign's rules and its status as of now; its budget, what it has granted
    (`granted`, `grants_count`: every grant the read side has applied) and what is left; what
    it granted in the last hour, and when its budget runs out at that rate
    (`projected_exhaustion_at`). Needs the `admin` scope.

    The figures are as of `as_of`, like every answer: a grant recorded after it is not in
    them yet. A campaign the read side does not know (yet) is 404 `campaign_not_found`."""
    as_of = await resources.freshness.as_of()
    now = utcnow()
    found = await resources.run(
        lambda: read_campaigns(engine=resources.engine, now=now, only=campaign_id)
    )
    if not found:
        raise ApiError(404, "campaign_not_found", "No such campaign.", {"campaign_id": campaign_id})
    return data_response(found[0], as_of)


# -- the read and its SQL ---------------------------------------------------------------------


def read_campaigns(
    *,
    engine: Engine,
    now: datetime,
    only: str | None = None,
    after: str | None = None,
    limit: int = 1,
) -> list[dict[str, Any]]:
    """The campaign ``only``, or up to ``limit`` campaigns after ``after`` by id, with their
    figures, in one read-only transaction."""
    since = last_hour_since(now)
    with engine.connect() as conn:
        rows = campaign_rows(conn, only=only, after=after, limit=limit)
        ids = [r.campaign_id for r in rows]
        totals = totals_of(conn, ids)
        recent = last_hour_of(conn, ids, since)
    return [
        campaign_body(
            row,
            totals=totals.get(row.campaign_id, (0, 0)),
            last_hour=recent.get(row.campaign_id, (0, 0)),
            now=now,
            since=since,
        )
        for row in rows
    ]


def campaign_rows(
    conn: sa.Connection, *, only: str | None, after: str | None, limit: int
) -> Sequence[sa.Row[Any]]:
    c = campaigns.c
    query = sa.select(campaigns)
    if only is not None:
        query = query.where(c.campaign_id == only)
    if after is not None:
        query = query.where(c.campaign_id > after)
    return conn.execute(query.order_by(c.campaign_id).limit(limit)).all()


def totals_of(conn: sa.Connection, ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(granted, grants) of each campaign that has granted anything (its primary key)."""
    if not ids:
        return {}
    t = campaign_totals.c
    rows = conn.execute(
        sa.select(t.campaign_id, t.granted_amount, t.grants_count).where(t.campaign_id.in_(ids))
    )
    return {cid: (int(amount), int(count)) for cid, amount, count in rows}


def last_hour_of(
    conn: sa.Connection, ids: Sequence[str], since: datetime
) -> dict[str, tuple[int, int]]:
    """(granted, grants) of each campaign since ``since``: a range of at most 61 minutes of
    the primary key per campaign."""
    if not ids:
        return {}
    m = campaign_minute_totals.c
    rows = conn.execute(
        sa.select(m.campaign_id, sa.func.sum(m.granted_amount), sa.func.sum(m.grants_count))
        .where(m.campaign_id.in_(ids), m.minute >= since)
        .group_by(m.campaign_id)
    )
    return {cid: (int(amount), int(count)) for cid, amount, count in rows}


# -- the answer -------------------------------------------------------------------------------


def last_hour_since(now: datetime) -> datetime:
    """The start of the minute an hour before ``now``'s: the last hour's figures are the
    whole minutes from there on (60 to 61 minutes, never less than an hour)."""
    return (now - LAST_HOUR).replace(second=0, microsecond=0)


def campaign_body(
    row: sa.Row[Any],
    *,
    totals: tuple[int, int],
    last_hour: tuple[int, int],
    now: datetime,
    since: datetime,
) -> dict[str, Any]:
    rules = parse_rules(orjson.loads(row.rules))
    state = CampaignState(
        rules=rules,
        version=row.version,
        created_at=row.created_at,
        stopped_at=row.stopped_at,
        exhausted_at=row.exhausted_at,
    )
    status = state.status_at(now)
    granted, grants = totals
    remaining = max(0, rules.budget - granted)
    recent_amount, recent_grants = last_hour
    projected = None
    if status == "active" and recent_amount > 0:
        projected = exhaustion_at(now, since, remaining, recent_amount, rules.ends_at)
    return {
        "campaign_id": row.campaign_id,
        "name": rules.name,
        "kind": rules.kind,
        "currency": rules.currency,
        "status": status,
        "starts_at": rules.starts_at,
        "ends_at": rules.ends_at,
        "time_zone": rules.time_zone,
        "rules": {k: v for k, v in rules.model_dump().items() if k not in COMMON_RULES},
        "budget": rules.budget,
        "granted": granted,
        "remaining": remaining,
        "grants_count": grants,
        "last_hour_since": since,
        "granted_last_hour": recent_amount,
        "grants_last_hour": recent_grants,
        "projected_exhaustion_at": projected,
        "created_at": row.created_at,
        "stopped_at": row.stopped_at,
        "exhausted_at": row.exhausted_at,
        "version": row.version,
        "updated_at": row.updated_at,
    }


def exhaustion_at(
    now: datetime, since: datetime, remaining: int, recent: int, ends_at: datetime
) -> datetime | None:
    """When ``remaining`` is spent at the rate of ``recent`` granted between ``since`` and
    ``now`` (in whole microseconds, integers throughout: budgets are up to 10^15); None when
    the campaign ends first (its budget then outlasts it)."""
    window = (now - since) // timedelta(microseconds=1)
    needed = remaining * window // recent
    if needed >= (ends_at - now) // timedelta(microseconds=1):
        return None
    return now + timedelta(microseconds=needed)
