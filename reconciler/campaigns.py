"""Campaigns in a run: their streams are neither payments nor wallets, and their grants' figures
stay as they were when a wallet is repaired.

A campaign's stream id is a UUID of version 8 (``kessai.campaigns.campaign_stream_id``;
``is_campaign_stream``): its events are in ``campaign_events``, never in ``events`` or
``wallet_events``, so a run never compares or re-publishes it as a payment or a wallet. A
parked event or an open dead letter of one is reported, and left unrepaired (the run is
drift), as a registration's is.

A grant (``RewardGranted``) is a wallet's movement and is checked as one (the chain, the
trial balance, the read side's balance and statement: ``reconciler.wallets``). The projector
adds it to its campaign's figures (``campaign_totals``, ``campaign_minute_totals``) when it
applies the movement; repairing a wallet removes its read rows and re-publishes every movement,
so the projector applies its grants again. ``compensate`` takes out of the figures, in the
transaction that removes the rows, what the grants the projector had applied added: the
figures end as they were, as ``reconciler.totals.compensate`` does for the merchants' totals.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa

from kessai.db import upsert_rows
from kessai.events import RewardGranted, parse_wallet_event
from kessai.schema import read
from reconciler.loaders import EventRow

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
        if event_type == "RewardGranted"
        for event in [parse_wallet_event(body)]
        if isinstance(event, RewardGranted)
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
        minute = grant.occurred_at.astimezone(UTC).replace(second=0, microsecond=0)
        for sums in (
            totals.setdefault(campaign_id, [0, 0]),
            minutes.setdefault((campaign_id, minute), [0, 0]),
        ):
            sums[0] -= amount
            sums[1] -= 1
    upsert_rows(
        conn, read.campaign_totals, ("campaign_id", *GRANTED),
        [(key, *sums) for key, sums in sorted(totals.items())], add=GRANTED,
    )  # fmt: skip
    upsert_rows(
        conn, read.campaign_minute_totals, ("campaign_id", "minute", *GRANTED),
        [(*key, *sums) for key, sums in sorted(minutes.items())], add=GRANTED,
    )  # fmt: skip
