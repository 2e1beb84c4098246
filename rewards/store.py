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
- A refund's take-back is keyed ``(campaign, user, month, <payment>/<refund>)``: a redelivered
  refund collides on it (or finds it). What a user owes is the newest ``reward_debts`` row;
  every change of it appends the next version, and every take-back that moves money the
  wallet's next one: two transactions taking back from or paying off one user's debts at once
  collide on one of them, so a debt is paid once and a wallet never gives more than it holds.

The budget is not a hot row: it takes one append per campaign per batch, not per grant.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import datetime

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.db import upsert
from kessai.grants import WELCOME_PERIOD, GrantKey, MonthKey, payment_facts
from kessai.ids import new_id
from kessai.schema.write import campaign_budget, reward_debts, reward_grants
from kessai.write_store import (
    append_events,
    chunked,
    existing_grant_keys,
    grant_month_sums,
    is_write_conflict,
    load_campaigns,
    load_captured,
    load_debts,
    load_granted,
    load_wallets,
)
from rewards.batch import Credited, Refunded
from rewards.decide import (
    BatchDecision,
    Before,
    Fact,
    decide_batch,
    keys_of,
    refund_months,
)

Hook = Callable[[sa.Connection], None]


def refund_rows(
    conn: sa.Connection, months: Collection[MonthKey], payments: Collection[uuid.UUID]
) -> dict[GrantKey, int]:
    """The ``reward_grants`` rows of ``payments`` (their grants, key ``<payment id>``, and
    take-backs, ``<payment id>/<refund id>``) in the ``months`` ranges: a primary-key range
    each, holding one user's grants of a month of one campaign (few: the month cap)."""
    wanted = {str(payment_id) for payment_id in payments}
    g = reward_grants.c
    found: dict[GrantKey, int] = {}
    for chunk in chunked(months):
        columns = sa.tuple_(g.campaign_id, g.user_id, g.period)
        rows = conn.execute(
            sa.select(g.campaign_id, g.user_id, g.period, g.grant_key, g.amount).where(
                columns.in_(chunk)
            )
        )
        for campaign_id, user_id, period, grant_key, amount in rows:
            if str(grant_key).partition("/")[0] in wanted:
                found[(str(campaign_id), str(user_id), str(period), str(grant_key))] = int(amount)
    return found


def read_before(conn: sa.Connection, facts: Sequence[Fact]) -> Before | None:
    """What the batch's decision depends on, read once (``None``: nothing in the batch can
    grant, take back or pay off a debt)."""
    campaigns = load_campaigns(conn)
    keys = keys_of(campaigns, facts)
    refunded = {f.payment_id for f in facts if isinstance(f, Refunded)}
    payments = {
        payment_id: payment_facts(event)
        for payment_id, event in load_captured(conn, refunded).items()
    }
    months = refund_months(campaigns, payments)
    rows = refund_rows(conn, months, payments)
    credited = {f.user_id for f in facts if isinstance(f, Credited)}
    debts = load_debts(conn, credited | {p.user_id for p in payments.values()})
    owing = {user_id for user_id, d in debts.items() if d.items}
    if not keys and not rows and not owing:
        return None
    users = {key[1] for key in keys} | {p.user_id for p in payments.values()} | owing
    touched = {key[0] for key in keys} | {key[0] for key in rows}
    touched |= {debt.campaign_id for user_id in owing for debt in debts[user_id].items}
    return Before(
        campaigns=campaigns,
        existing=existing_grant_keys(conn, keys),
        granted=load_granted(conn, touched),
        wallets=load_wallets(conn, users),
        month_sums=grant_month_sums(conn, {key[:3] for key in keys if key[2] != WELCOME_PERIOD}),
        payments=payments,
        refund_rows=rows,
        debts=debts,
    )


def record_grants(
    conn: sa.Connection,
    facts: Sequence[Fact],
    *,
    shards: int,
    now: datetime,
    ids: Callable[[], uuid.UUID] = new_id,
    before_write: Hook | None = None,
) -> BatchDecision:
    """Read what the batch's grants and take-backs depend on, decide them (``rewards.decide``)
    and append them, inside the transaction ``conn`` is in (its caller's to commit).
    ``before_write`` runs after the decision and before the appends (tests play a concurrent
    writer with it)."""
    before = read_before(conn, facts)
    if before is None:
        return BatchDecision()
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
    upsert(conn, reward_debts, decision.debt_rows)
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
