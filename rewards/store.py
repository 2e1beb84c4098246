"""The grant transaction: one write-store transaction per consumed batch, begun and committed
here (``commit_grants``) and nowhere else, run again from the top when another transaction
took what this one meant to append.

Why nothing is granted twice and the budget is never overspent, whatever runs at once (two
rewards instances, a redelivered batch, a rebalance): every grant appends rows whose primary
keys another grant of the same thing would need too.

- ``reward_grants``' key is ``(campaign, user, month, payment)`` for a cashback and ``(campaign,
  user, 'welcome', 'user')`` for a welcome bonus: a second grant of one payment (or one user's
  bonus) by one campaign fails its transaction, which decides again and finds the first.
- A campaign's total granted is its newest ``campaign_budget`` row, and each batch that grants
  from a campaign appends the next one: two transactions granting from one campaign at once
  collide on that version, so the second decides again against the first's total.
- A user's month cap is read from ``reward_grants``, and every grant appends the user's next
  wallet movement: two transactions granting to one user at once collide on the wallet's
  version, so the second sees the first's grants in the month.

The budget is not a hot row: it takes one append per campaign per batch, not per grant.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.db import upsert
from kessai.ids import new_id
from kessai.schema.write import campaign_budget, reward_grants
from kessai.write_store import (
    append_events,
    is_write_conflict,
    load_campaigns,
    load_granted,
    load_wallets,
)
from rewards.decide import (
    WELCOME_PERIOD,
    BatchDecision,
    Before,
    Fact,
    GrantKey,
    MonthKey,
    decide_batch,
    keys_of,
    user_of,
)

Hook = Callable[[sa.Connection], None]
_K = TypeVar("_K", GrantKey, MonthKey)
CHUNK = 1_000
"""Keys per statement (SQLite takes at most 32,766 parameters in one)."""


def _chunks(keys: Collection[_K]) -> Iterable[list[_K]]:
    ordered = sorted(keys)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


def existing_keys(conn: sa.Connection, keys: Collection[GrantKey]) -> frozenset[GrantKey]:
    """Which of ``keys`` ``reward_grants`` holds: primary-key lookups."""
    g = reward_grants.c
    found: set[GrantKey] = set()
    for chunk in _chunks(keys):
        columns = sa.tuple_(g.campaign_id, g.user_id, g.period, g.grant_key)
        rows = conn.execute(
            sa.select(g.campaign_id, g.user_id, g.period, g.grant_key).where(columns.in_(chunk))
        )
        found.update((str(c), str(u), str(p), str(k)) for c, u, p, k in rows)
    return frozenset(found)


def month_sums(conn: sa.Connection, months: Collection[MonthKey]) -> dict[MonthKey, int]:
    """What each ``(campaign, user, month)`` of ``months`` has been granted (net of
    take-backs): a primary-key range each."""
    g = reward_grants.c
    found: dict[MonthKey, int] = {}
    for chunk in _chunks(months):
        columns = sa.tuple_(g.campaign_id, g.user_id, g.period)
        rows = conn.execute(
            sa.select(g.campaign_id, g.user_id, g.period, sa.func.sum(g.amount))
            .where(columns.in_(chunk))
            .group_by(g.campaign_id, g.user_id, g.period)
        )
        for campaign_id, user_id, period, total in rows:
            found[(str(campaign_id), str(user_id), str(period))] = int(total)
    return found


def record_grants(
    conn: sa.Connection,
    facts: Sequence[Fact],
    *,
    shards: int,
    now: datetime,
    ids: Callable[[], uuid.UUID] = new_id,
    before_write: Hook | None = None,
) -> BatchDecision:
    """Read what the batch's grants depend on, decide them (``rewards.decide``) and append
    them, inside the transaction ``conn`` is in (its caller's to commit). ``before_write``
    runs after the decision and before the appends (tests play a concurrent writer with it)."""
    campaigns = load_campaigns(conn)
    keys = keys_of(campaigns, facts)
    if not keys:
        return BatchDecision()
    granted = load_granted(conn, {key[0] for key in keys})
    before = Before(
        campaigns=campaigns,
        existing=existing_keys(conn, keys),
        granted=granted,
        wallets=load_wallets(conn, {user_of(fact) for fact in facts}),
        month_sums=month_sums(conn, {key[:3] for key in keys if key[2] != WELCOME_PERIOD}),
    )
    decision = decide_batch(facts, before, now=now, ids=ids)
    if before_write is not None:
        before_write(conn)
    append_events(conn, [*decision.wallet_events, *decision.campaign_events], shards=shards)
    grant_rows = sorted(
        decision.grant_rows,
        key=lambda r: (r["campaign_id"], r["user_id"], r["period"], r["grant_key"]),
    )
    upsert(conn, reward_grants, grant_rows)
    upsert(conn, campaign_budget, decision.budget_rows)
    return decision


def commit_grants(
    engine: Engine,
    facts: Sequence[Fact],
    *,
    shards: int,
    attempts: int,
    on_retry: Callable[[], None] | None = None,
    clock: Callable[[], datetime] = utcnow,
    ids: Callable[[], uuid.UUID] = new_id,
    before_write: Hook | None = None,
) -> BatchDecision:
    """``facts``' grants in one transaction, decided again from the top while it loses a race
    (``is_write_conflict``: a key, a wallet's or a budget's version taken meanwhile, a
    deadlock), at most ``attempts`` times; the last failure is raised."""

    def once() -> BatchDecision:
        with engine.begin() as conn:
            return record_grants(
                conn, facts, shards=shards, now=clock(), ids=ids, before_write=before_write
            )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_write_conflict),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=0.002, max=0.1),
        before_sleep=lambda _state: on_retry() if on_retry is not None else None,
        reraise=True,
    )
    return retrying(once)
