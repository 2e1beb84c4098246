"""Every eligible payment has its grant: ``grant_missing`` findings, repaired by re-publishing.

Grants are asynchronous: the rewards service consumes a payment's ``PaymentCaptured`` (a user's
``UserRegistered``) from the topic and records the grant in a transaction of its own. A grant
that never came (the service was down when the event went by and its group's offsets moved on,
a broker restarted empty behind it) is found here. For each captured payment in the run's scope
(by the time-ordered ``event_id``, looked at from ``reconcile_grant_grace_seconds`` before the
scope's start, so a payment still in its grace period in one run is in the next one's), and for
each cashback campaign created before the payment was recorded and not exhausted, the rules
decide (``kessai.grants.eligibility``: the window, a stop, the currency, the method, the
merchant, the minimum) whether the payment earns; one that does and has no ``reward_grants``
row (a primary-key lookup) is missing when:

- it was recorded more than the grace period ago;
- the user's grants of the campaign in the payment's month leave room under the cap, and the
  cashback does not round to nothing (``kessai.grants.cashback`` against what the user holds
  now);
- the user's wallet does not hold another currency than the campaign's.

The caps and the budget depend on the order the grants were made in: an eligible payment may
rightly get nothing because the user's month was full or the budget ran out. So a campaign that
is exhausted is not asked about, and a user at the cap is not reported. Registrations and the
welcome bonus the same way (a key per campaign and user).

Each missing grant is reported, and the event that earns it re-published on the topic
(``reconciler.republish``, marked as a replay): the rewards service consumes it again, and the
grant's key makes a second consumption harmless. The finding stays unrepaired in its run (the
grant is for the rewards service to make): the run is drift and the watermark stays, so the
next run looks at the payment again and finds its grant.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from kessai.campaigns import CampaignState, CashbackRules, WelcomeBonusRules
from kessai.clock import utcnow
from kessai.events import (
    PaymentCaptured,
    UserRegistered,
    parse_any_event,
    parse_event,
    registration_stream_id,
)
from kessai.grants import (
    Grant,
    GrantKey,
    PaymentFacts,
    cashback,
    cashback_key,
    eligibility,
    payment_facts,
    welcome_bonus,
    welcome_key,
)
from kessai.ids import bound_at_ms, timestamp_ms
from kessai.schema.write import events, user_registrations
from kessai.write_store import existing_grant_keys, grant_month_sums, load_wallets
from reconciler.context import RunContext
from reconciler.loaders import EventRow, load_bodies
from reconciler.records import Finding
from reconciler.republish import republisher


@dataclass(frozen=True, slots=True)
class Owed:
    """A grant the rules say an event earns from a campaign."""

    key: GrantKey
    state: CampaignState
    row: EventRow
    """The event that earns it, as re-published."""
    recorded_at: datetime
    facts: PaymentFacts | None = None
    """A payment's (``None``: a registration's)."""


async def check(
    ctx: RunContext,
    lower: uuid.UUID | None,
    states: Mapping[str, CampaignState],
    *,
    dry_run: bool,
) -> list[Finding]:
    """The run's ``grant_missing`` findings (``lower``: None, a full audit); the events that
    earn them re-published unless ``dry_run``."""
    grace = timedelta(seconds=ctx.settings.reconcile_grant_grace_seconds)
    since = None
    if lower is not None:
        since = bound_at_ms(timestamp_ms(lower) - int(grace.total_seconds() * 1000))
    cutoff = utcnow() - grace
    missing = await asyncio.to_thread(ctx.in_write, lambda c: find(c, since, states, cutoff))
    if missing and not dry_run:
        ctx.checkpoint()
        rows = await asyncio.to_thread(ctx.in_write, lambda c: _to_republish(c, missing))
        async with republisher(ctx.settings) as send:
            await send(rows)
    return [_finding(owed, amount, republished=not dry_run) for owed, amount in missing]


def _to_republish(conn: sa.Connection, missing: Sequence[tuple[Owed, int]]) -> list[EventRow]:
    """What to publish again for the missing grants: a registration's event, and a payment's
    whole history in version order, not its capture alone: a payment refunded since must reach
    the rewards service with its refunds after it, which take back what the capture earns."""
    payments = sorted({o.row[0] for o, _ in missing if o.row[3] == "PaymentCaptured"})
    rows = {o.row[2]: o.row for o, _ in missing if o.row[3] != "PaymentCaptured"}
    return [*load_bodies(conn, payments), *(rows[i] for i in sorted(rows))]


def find(
    conn: sa.Connection,
    since: uuid.UUID | None,
    states: Mapping[str, CampaignState],
    cutoff: datetime,
) -> list[tuple[Owed, int]]:
    """The grants owed by the events recorded from ``since`` (None: ever) up to ``cutoff``
    that the write store does not hold and nothing explains, with the amount each earns."""
    live = {c: s for c, s in states.items() if s.exhausted_at is None}
    owed = [*_payments(conn, since, live, cutoff), *_registrations(conn, since, live, cutoff)]
    held = existing_grant_keys(conn, {o.key for o in owed})
    absent = [o for o in owed if o.key not in held]
    if not absent:
        return []
    sums = grant_month_sums(conn, {o.key[:3] for o in absent if o.facts is not None})
    wallets = load_wallets(conn, {o.key[1] for o in absent})
    missing = []
    for o in absent:
        currency = wallets[o.key[1]].currency
        if currency is not None and currency != o.state.rules.currency:
            continue  # the rewards service grants nothing into a wallet of another currency
        amount = _earned(o, sums.get(o.key[:3], 0))
        if amount > 0:
            missing.append((o, amount))
    return missing


def _earned(owed: Owed, month_sum: int) -> int:
    if owed.facts is None:
        rules = owed.state.rules
        return rules.amount if isinstance(rules, WelcomeBonusRules) else 0
    earned = cashback(owed.state, owed.facts, granted_this_month=max(month_sum, 0))
    return earned.amount if isinstance(earned, Grant) else 0


def _payments(
    conn: sa.Connection,
    since: uuid.UUID | None,
    states: Mapping[str, CampaignState],
    cutoff: datetime,
) -> list[Owed]:
    cashbacks = [s for s in states.values() if isinstance(s.rules, CashbackRules)]
    if not cashbacks:
        return []
    e = events.c
    query = sa.select(
        e.payment_id, e.version, e.event_id, e.event_type, e.schema_version, e.body, e.recorded_at
    ).where(e.event_type == "PaymentCaptured", e.recorded_at <= cutoff)
    if since is not None:
        query = query.where(e.event_id >= since)
    owed = []
    for (
        payment_id,
        version,
        event_id,
        event_type,
        schema_version,
        body,
        recorded_at,
    ) in conn.execute(query):
        try:
            event = parse_event(body)
        except ValueError:  # the payments' check reports what does not parse
            continue
        if not isinstance(event, PaymentCaptured):
            continue
        facts = payment_facts(event)
        row: EventRow = (payment_id, version, event_id, event_type, schema_version, body)
        for state in cashbacks:
            if recorded_at < state.created_at or eligibility(state, facts) is not None:
                continue
            key = cashback_key(state.campaign_id, state.rules.zone, facts)
            owed.append(Owed(key, state, row, recorded_at, facts))
    return owed


def _registrations(
    conn: sa.Connection,
    since: uuid.UUID | None,
    states: Mapping[str, CampaignState],
    cutoff: datetime,
) -> list[Owed]:
    welcomes = [s for s in states.values() if isinstance(s.rules, WelcomeBonusRules)]
    if not welcomes:
        return []
    r = user_registrations.c
    query = sa.select(
        r.user_id, r.event_id, r.event_type, r.schema_version, r.body, r.recorded_at
    ).where(r.recorded_at <= cutoff)
    if since is not None:
        query = query.where(r.event_id >= since)
    owed = []
    for user_id, event_id, event_type, schema_version, body, recorded_at in conn.execute(query):
        try:
            event = parse_any_event(body)
        except ValueError:
            continue
        if not isinstance(event, UserRegistered):
            continue
        row: EventRow = (
            registration_stream_id(user_id),
            1,
            event_id,
            event_type,
            schema_version,
            body,
        )
        for state in welcomes:
            if recorded_at < state.created_at or welcome_bonus(state, event.occurred_at) is None:
                continue
            key = welcome_key(state.campaign_id, str(user_id))
            owed.append(Owed(key, state, row, recorded_at))
    return owed


def _finding(owed: Owed, amount: int, *, republished: bool) -> Finding:
    campaign_id, user_id, period, grant_key = owed.key
    stream, *_ = owed.row
    return Finding(
        kind="grant_missing",
        payment_id=stream,
        merchant_id=None if owed.facts is None else owed.facts.merchant_id,
        details={
            "campaign_id": campaign_id,
            "user_id": user_id,
            "grant_key": f"{period}/{grant_key}",
            "earns": amount,
            "recorded_at": owed.recorded_at.isoformat(),
            "republished": republished,
        },
    )
