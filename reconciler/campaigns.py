"""Campaigns in a run: their streams are neither payments nor wallets, each campaign's read row is
its stream's fold, and their grants' figures stay as they were when a wallet is repaired.

A campaign's stream id is a UUID of version 8 (``kessai.campaigns.campaign_stream_id``;
``is_campaign_stream``): its events are in ``campaign_events``, never in ``events`` or
``wallet_events``, so the payments' and wallets' checks never compare or re-publish it.
``check`` compares every campaign (a few hundred at most: every run looks at all of them) with
the fold of its stream in the write store: a read row that is missing or differs, or a parked
event or an open dead letter of its stream, twice ``reconcile_confirm_seconds`` apart, is a
``campaign`` finding. It is repaired like a wallet: the row is removed under the projector's
offset locks, every event of the campaign is re-published, and the run waits until it
matches; the parked events and dead letters of the stream are then settled with it. A campaign
with an event still in the outbox is not judged (the relay has yet to publish it).

A grant (``RewardGranted``) is a wallet's movement and is checked as one (the chain, the
trial balance, the read side's balance and statement: ``reconciler.wallets``). The projector
adds it to its campaign's figures (``campaign_totals``, ``campaign_minute_totals``) when it
applies the movement; repairing a wallet removes its read rows and re-publishes every movement,
so the projector applies its grants again. ``compensate`` takes out of the figures, in the
transaction that removes the rows, what the grants the projector had applied added: the
figures end as they were, as ``reconciler.totals.compensate`` does for the merchants' totals.
Each campaign's budget against its grants, its figures against the write store's and every
eligible payment's grant are checked after this (``reconciler.budgets``, ``reconciler.missing``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from kessai.campaigns import (
    CampaignState,
    campaign_stream_id,
    fold_campaign,
    parse_campaign_event,
)
from kessai.db import upsert_rows
from kessai.events import RewardGranted, RewardTakenBack, parse_wallet_event
from kessai.schema import read, write
from reconciler import totals as locks
from reconciler.context import RunContext
from reconciler.loaders import EventRow
from reconciler.records import Finding
from reconciler.republish import republisher

CAMPAIGN_STREAM_UUID_VERSION = 8
GRANTED = ("granted_amount", "grants_count")


def is_campaign_stream(stream_id: uuid.UUID | None) -> bool:
    """A campaign's stream (``kessai.campaigns.campaign_stream_id``, a UUID of version 8)."""
    return stream_id is not None and stream_id.version == CAMPAIGN_STREAM_UUID_VERSION


def applied_versions(conn: sa.Connection, users: Sequence[str]) -> dict[str, int]:
    """How far the projector applied each wallet: its read row's version (the projector
    replaces it with every batch), or its newest statement line's when the row is gone."""
    wr, wm = read.wallets.c, read.wallet_movements.c
    found: dict[str, int] = {}
    rows = [
        *conn.execute(sa.select(wr.user_id, wr.version).where(wr.user_id.in_(users))),
        *conn.execute(
            sa.select(wm.user_id, sa.func.max(wm.version))
            .where(wm.user_id.in_(users))
            .group_by(wm.user_id)
        ),
    ]
    for user_id, version in rows:
        found[user_id] = max(found.get(user_id, 0), int(version))
    return found


def compensate(conn: sa.Connection, republished: Sequence[EventRow]) -> None:
    """Take out of the campaigns' figures what the grants among ``republished`` (every
    movement of wallets whose read rows are being removed) added when the projector applied
    them: those up to each wallet's applied version. Runs under the projector's locks, in the
    transaction that removes the rows; the projector adds them back as it applies them again,
    and a grant it never applied (a dead letter, one still on its way) is added then, once."""
    grants = [
        event
        for *_, event_type, _, body in republished
        if event_type in ("RewardGranted", "RewardTakenBack")
        for event in [parse_wallet_event(body)]
        if isinstance(event, RewardGranted | RewardTakenBack)
    ]
    if not grants:
        return
    applied = applied_versions(conn, sorted({g.user_id for g in grants}))
    totals: dict[str, list[int]] = {}
    minutes: dict[tuple[str, datetime], list[int]] = {}
    for grant in grants:
        if grant.version > applied.get(grant.user_id, 0):
            continue
        campaign_id, amount = grant.payload.campaign_id, grant.payload.amount
        counted = 1 if isinstance(grant, RewardGranted) else 0  # a take-back: -amount, no count
        if not counted:
            amount = -amount
        minute = grant.occurred_at.astimezone(UTC).replace(second=0, microsecond=0)
        for sums in (
            totals.setdefault(campaign_id, [0, 0]),
            minutes.setdefault((campaign_id, minute), [0, 0]),
        ):
            sums[0] -= amount
            sums[1] -= counted
    upsert_rows(
        conn, read.campaign_totals, ("campaign_id", *GRANTED),
        [(key, *sums) for key, sums in sorted(totals.items())], add=GRANTED,
    )  # fmt: skip
    upsert_rows(
        conn, read.campaign_minute_totals, ("campaign_id", "minute", *GRANTED),
        [(*key, *sums) for key, sums in sorted(minutes.items())], add=GRANTED,
    )  # fmt: skip


# -- each campaign's read row --------------------------------------------------------------------


async def check(
    ctx: RunContext, in_flight: set[uuid.UUID], findings: list[Finding], *, dry_run: bool
) -> tuple[list[Finding], list[Finding]]:
    """``findings`` with the parked events and dead letters of campaign streams settled (marked
    repaired when their campaign matches after the run), and the run's ``campaign`` findings."""
    truth, broken = await asyncio.to_thread(ctx.in_write, folds)
    judged = {c: s for c, s in truth.items() if campaign_stream_id(c) not in in_flight}
    wrong = await asyncio.to_thread(_differing, ctx, judged)
    if wrong and ctx.settings.reconcile_confirm_seconds > 0:
        await ctx.sleep(ctx.settings.reconcile_confirm_seconds)  # projector lag is not drift
        wrong = await asyncio.to_thread(_differing, ctx, {c: judged[c] for c in wrong})
    remaining = set(wrong)
    if wrong and not dry_run:
        ctx.checkpoint()
        remaining = await _repair(ctx, {c: judged[c] for c in wrong})
    matching = set() if dry_run else {campaign_stream_id(c) for c in judged if c not in remaining}
    settled = [
        replace(f, repaired=f.payment_id in matching)
        if is_campaign_stream(f.payment_id) and f.kind in ("parked", "dead_letter")
        else f
        for f in findings
    ]
    found = [
        Finding(
            kind="campaign",
            payment_id=campaign_stream_id(c),
            details={"campaign_id": c, **detail},
            repaired=campaign_stream_id(c) in matching,
        )
        for c, detail in sorted(wrong.items())
    ]
    found += [  # the write store is the truth: nothing to repair from
        Finding(kind="campaign", payment_id=campaign_stream_id(c), details={"campaign_id": c,
                "problem": problem})
        for c, problem in sorted(broken.items())
    ]  # fmt: skip
    return settled, found


def folds(conn: sa.Connection) -> tuple[dict[str, CampaignState], dict[str, str]]:
    """Every campaign of the write store folded from its stream; and the campaigns whose
    stream does not fold (unreadable, or an event that cannot follow), with why."""
    c = write.campaign_events.c
    streams: dict[str, list[str]] = {}
    for campaign_id, body in conn.execute(
        sa.select(c.campaign_id, c.body).order_by(c.campaign_id, c.version)
    ):
        streams.setdefault(campaign_id, []).append(body)
    folded, broken = {}, {}
    for campaign_id, bodies in streams.items():
        try:
            folded[campaign_id] = fold_campaign(parse_campaign_event(b) for b in bodies)
        except ValueError as exc:  # pydantic's errors and InvariantViolation are ValueErrors
            broken[campaign_id] = str(exc)[:500]
    return folded, broken


def _want(state: CampaignState) -> tuple[object, ...]:
    """What a campaign's read row must say (version, budget, end, stop, exhaustion)."""
    r = state.rules
    return (state.version, r.budget, r.ends_at, state.stopped_at, state.exhausted_at)


def _have(row: Any) -> tuple[object, ...]:
    return (row.version, row.budget, row.ends_at, row.stopped_at, row.exhausted_at)


def _differing(ctx: RunContext, truth: dict[str, CampaignState]) -> dict[str, dict[str, object]]:
    """The campaigns of ``truth`` whose read row is missing or is not their fold, or whose
    stream has a parked event or an open dead letter: both sides' version and budget."""
    if not truth:
        return {}
    streams = sorted(campaign_stream_id(c) for c in truth)
    rc, pe, dl = read.campaigns.c, read.parked_events.c, read.dead_letters.c
    with ctx.read.connect() as conn:
        rows = {
            r.campaign_id: r
            for r in conn.execute(
                sa.select(read.campaigns).where(rc.campaign_id.in_(sorted(truth)))
            )
        }
        stuck = {
            *conn.execute(sa.select(pe.payment_id).where(pe.payment_id.in_(streams))).scalars(),
            *conn.execute(
                sa.select(dl.payment_id).where(dl.payment_id.in_(streams), dl.status == "open")
            ).scalars(),
        }
    wrong: dict[str, dict[str, object]] = {}
    for campaign_id, state in truth.items():
        row = rows.get(campaign_id)
        want, have = _want(state), None if row is None else _have(row)
        if have != want or campaign_stream_id(campaign_id) in stuck:
            wrong[campaign_id] = {
                "write_version": want[0],
                "read_version": None if have is None else have[0],
                "write_budget": want[1],
                "read_budget": None if have is None else have[1],
            }
    return wrong


async def _repair(ctx: RunContext, campaigns: dict[str, CampaignState]) -> set[str]:
    """Remove the campaigns' read rows, re-publish every event of theirs, wait until the read
    side matches; the campaigns still wrong when the wait ran out."""
    ids = sorted(campaigns)
    rows = await asyncio.to_thread(ctx.in_write, lambda c: _bodies(c, ids))
    async with republisher(ctx.settings) as send:
        await asyncio.to_thread(_delete_rows, ctx, ids)
        await send(rows)
    return await ctx.wait_until_right(
        ids, lambda keys: _differing(ctx, {c: campaigns[c] for c in keys})
    )


def _bodies(conn: sa.Connection, ids: list[str]) -> list[EventRow]:
    c = write.campaign_events.c
    rows = conn.execute(
        sa.select(c.campaign_id, c.version, c.event_id, c.event_type, c.schema_version, c.body)
        .where(c.campaign_id.in_(ids))
        .order_by(c.campaign_id, c.version)
    )
    return [(campaign_stream_id(i), v, e, t, s, b) for i, v, e, t, s, b in rows]


def _delete_rows(ctx: RunContext, ids: list[str]) -> None:
    """The campaigns' read rows, removed under the projector's offset locks (no batch
    interleaves): the re-published events rebuild them from version 1. Their figures are the
    grants', kept apart, and stay."""
    with ctx.read.begin() as conn:
        locks.lock_projector(conn, ctx.settings.topic)
        conn.execute(read.campaigns.delete().where(read.campaigns.c.campaign_id.in_(ids)))
