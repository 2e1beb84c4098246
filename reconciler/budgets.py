"""Each campaign's budget against its grants, in the write store (``campaign_budget`` findings),
and the campaigns' figures on the read side against them (``campaign_totals`` findings).

What a campaign has granted is written three times, in one transaction per batch of grants
(``rewards.store``): the wallet events that move the money (their postings to and from
``campaign:<id>``), one ``reward_grants`` row per grant or take-back (signed, naming its wallet
event by ``event_id``), and the ``campaign_budget`` row of the batch (its signed amount and the
total after it). The check compares sums of signed rows and postings, whatever event types they
come from: a take-back is a row and a posting the other way, and fits without a case of its own.

Every run, in one snapshot of the write store, per campaign:

- the newest ``campaign_budget.granted_after`` equals the sum of its ``campaign_budget`` amounts,
  and the sum of the campaign's ``reward_grants`` rows plus what users still owe it (a
  take-back's row holds the whole ``due``, the budget only what the wallet gave back), and
  never exceeds the budget of the campaign's folded stream;
- the rows and the wallet events in the run's scope (by their time-ordered ``event_id``, which
  row and event share) match one for one: each row has its wallet event, of the same campaign,
  user and amount, and each wallet event that posts to a campaign has its row.

A full audit's scope is everything, so there the newest total equals the sum of the postings to
and from the campaign's account in the wallet streams, literally; an incremental run checks
that one to one inside its scope and the totals everywhere, which carries the equality on from
the run before. The reads are by primary key (the sums are ranges of it, per campaign) and by
the unique ``event_id``: nothing needs an index the write path does not have.

A difference there is never repaired: the write store is the truth, and a budget that disagrees
with its grants is a bug to page on, like the trial balance.

The read side's ``campaign_totals`` (the granted amount, net of take-backs, and the count of
grants) is compared with the write store's rows recorded before the run's upper bound (every
one of them is published), twice ``reconcile_confirm_seconds`` apart (projector lag is not
drift). A figure that still differs is rewritten under the projector's offset locks to what the
projector has applied: the rows whose wallet movement is at or below the version of its wallet
on the read side, the same reckoning ``reconciler.campaigns.compensate`` makes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kessai.campaigns import CampaignState, campaign_stream_id
from kessai.db import upsert_rows
from kessai.events import RewardTakenBack, parse_wallet_event
from kessai.grants import is_take_back
from kessai.postings import Posting, kind_of
from kessai.schema import read
from kessai.schema.write import campaign_budget, reward_debts, reward_grants, wallet_events
from kessai.write_store import load_debts, load_granted
from reconciler import totals as locks
from reconciler.campaigns import GRANTED, applied_versions
from reconciler.context import RunContext
from reconciler.movements import SIDES
from reconciler.records import Finding

CHUNK = 1_000
"""Event ids per lookup (SQLite takes at most 32,766 parameters in one statement)."""


@dataclass(frozen=True, slots=True)
class Row:
    """A ``reward_grants`` row, or what a wallet event posts to one campaign."""

    campaign_id: str
    user_id: str
    amount: int
    """What the campaign gave: positive for a grant, negative for a take-back."""
    key: str | None = None
    row_amount: int | None = 0
    """For a wallet event's flow: what its ``reward_grants`` row holds (a grant: its amount; a
    refund's take-back: ``-due``, of which the wallet gave ``amount`` and owes the rest);
    ``None``: no row (a debt paid off later: its row was the take-back's)."""
    take_back: bool = False
    """A ``reward_grants`` row of a take-back (``kessai.grants.take_back_key``)."""


@dataclass(frozen=True, slots=True)
class Sums:
    """A campaign's figures in the write store."""

    rows: int = 0
    grants: int = 0
    """Rows of a positive amount: the grants, without the take-backs."""
    batches: int = 0
    granted_after: int = 0
    owed: int = 0
    """What users still owe the campaign (``reward_debts``): take-back rows hold what was due,
    the budget only what came back, and this is the difference."""


def campaign_flows(postings: Iterable[Posting] | None) -> dict[str, int]:
    """What each campaign gives through ``postings``: minus the sum of its account's postings
    (a grant takes from the campaign's account, a take-back returns to it)."""
    flows: dict[str, int] = defaultdict(int)
    for posting in postings or ():
        if kind_of(posting.account) == "campaign":
            flows[posting.account.partition(":")[2]] -= posting.amount
    return {c: amount for c, amount in flows.items() if amount != 0}


def check(
    ctx: RunContext, lower: uuid.UUID | None, states: Mapping[str, CampaignState]
) -> list[Finding]:
    """The run's ``campaign_budget`` findings (``lower``: None, a full audit)."""
    with ctx.write.connect() as conn, conn.begin():  # one snapshot for every read
        sums = write_sums(conn)
        rows = _rows_since(conn, lower)
        moved = _moved_since(conn, lower)
    found = [
        _finding(campaign_id, problem, **figures)
        for campaign_id, problem, figures in _totals_problems(sums, states)
    ]
    found += _pairs(rows, moved)
    if lower is None:  # everything is in scope: the postings' sums, as such
        posted: dict[str, int] = defaultdict(int)
        for row in moved.values():
            for one in row:
                posted[one.campaign_id] += one.amount
        for campaign_id in sorted(set(posted) | set(sums)):
            have = sums.get(campaign_id, Sums())
            if posted.get(campaign_id, 0) != have.granted_after:
                found.append(
                    _finding(
                        campaign_id,
                        "the postings to and from the campaign's account are not its total",
                        postings=posted.get(campaign_id, 0),
                        granted_after=have.granted_after,
                    )
                )
    return found


def write_sums(conn: sa.Connection) -> dict[str, Sums]:
    """Every campaign's figures that has a grant row or a budget row."""
    g, b = reward_grants.c, campaign_budget.c
    positive = sa.case((g.amount > 0, 1), else_=0)
    of_rows = {
        str(c): (int(s), int(n))
        for c, s, n in conn.execute(
            sa.select(g.campaign_id, sa.func.sum(g.amount), sa.func.sum(positive)).group_by(
                g.campaign_id
            )
        )
    }
    of_batches = {
        str(c): int(s)
        for c, s in conn.execute(
            sa.select(b.campaign_id, sa.func.sum(b.amount)).group_by(b.campaign_id)
        )
    }
    newest = load_granted(conn, set(of_rows) | set(of_batches))
    owed = owed_by_campaign(conn)
    return {
        c: Sums(
            rows=of_rows.get(c, (0, 0))[0],
            grants=of_rows.get(c, (0, 0))[1],
            batches=of_batches.get(c, 0),
            granted_after=newest[c].amount,
            owed=owed.get(c, 0),
        )
        for c in sorted(newest)
    }


def owed_by_campaign(conn: sa.Connection) -> dict[str, int]:
    """What users owe each campaign now: the open debts of each user's newest
    ``reward_debts`` row (only users who ever owed have rows)."""
    users = [str(u) for u in conn.execute(sa.select(reward_debts.c.user_id).distinct()).scalars()]
    owed: dict[str, int] = defaultdict(int)
    for first in range(0, len(users), CHUNK):
        for debts in load_debts(conn, users[first : first + CHUNK]).values():
            for debt in debts.items:
                owed[debt.campaign_id] += debt.owed
    return dict(owed)


def _totals_problems(
    sums: Mapping[str, Sums], states: Mapping[str, CampaignState]
) -> list[tuple[str, str, dict[str, object]]]:
    problems = []
    for campaign_id, have in sums.items():
        figures: dict[str, object] = {
            "granted_after": have.granted_after,
            "grant_rows": have.rows,
            "batches": have.batches,
            "owed": have.owed,
        }
        state = states.get(campaign_id)
        if state is None:
            problem = "grants of a campaign whose stream is missing or does not fold"
            problems.append((campaign_id, problem, figures))
            continue
        figures["budget"] = state.rules.budget
        if have.rows + have.owed != have.granted_after:
            problem = "the grant rows do not add up to the total"
            problems.append((campaign_id, problem, figures))
        if have.batches != have.granted_after:
            problems.append((campaign_id, "the budget rows do not add up to the total", figures))
        if max(have.granted_after, have.rows) > state.rules.budget:
            problems.append((campaign_id, "granted more than the budget", figures))
    return problems


def _rows_since(conn: sa.Connection, lower: uuid.UUID | None) -> dict[uuid.UUID, Row]:
    g = reward_grants.c
    query = sa.select(g.event_id, g.campaign_id, g.user_id, g.period, g.grant_key, g.amount)
    if lower is not None:
        query = query.where(g.event_id >= lower)
    return {
        event_id: Row(str(c), str(u), int(amount), f"{p}/{k}", take_back=is_take_back(str(k)))
        for event_id, c, u, p, k, amount in conn.execute(query)
    }


def _moved_since(conn: sa.Connection, lower: uuid.UUID | None) -> dict[uuid.UUID, list[Row]]:
    """What each wallet event in scope gives from each campaign, for those that post to one
    (a payment's side does not post: its payment does)."""
    w = wallet_events.c
    query = sa.select(w.event_id, w.user_id, w.body).where(w.event_type.notin_(SIDES))
    if lower is not None:
        query = query.where(w.event_id >= lower)
    moved: dict[uuid.UUID, list[Row]] = {}
    for event_id, user_id, body in conn.execute(query):
        try:
            event = parse_wallet_event(body)
        except ValueError:  # the wallet's chain check reports what does not parse
            continue
        flows = campaign_flows(event.postings)
        if not flows:
            continue
        if isinstance(event, RewardTakenBack):
            p = event.payload
            row_amount = -p.due if p.kind == "refund" else None
            moved[event_id] = [Row(p.campaign_id, str(user_id), flows[p.campaign_id], None,
                                   row_amount)]  # fmt: skip
        else:
            moved[event_id] = [Row(c, str(user_id), a, None, a) for c, a in sorted(flows.items())]
    return moved


def _pairs(rows: Mapping[uuid.UUID, Row], moved: Mapping[uuid.UUID, list[Row]]) -> list[Finding]:
    """Each grant row against its wallet event, and each event that posts to a campaign
    against its row."""
    found = []
    for event_id in sorted(set(rows) | set(moved)):
        row = rows.get(event_id)
        flows = [f for f in moved.get(event_id, []) if f.row_amount is not None]
        if row is None:
            for flow in flows:
                found.append(
                    _finding(flow.campaign_id, "a wallet event posts to the campaign without "
                             "its grant row", event_id=str(event_id), user_id=flow.user_id,
                             event_amount=flow.amount, row_amount=None)
                )  # fmt: skip
            continue
        event = [(f.campaign_id, f.user_id, f.row_amount) for f in flows]
        if event == [(row.campaign_id, row.user_id, row.amount)]:
            continue
        if not flows and row.take_back:
            continue  # a take-back the wallet gave nothing of: owed whole, no event
        problem = (
            "a grant row without its wallet event"
            if not flows
            else "a grant row and its wallet event disagree"
        )
        found.append(
            _finding(row.campaign_id, problem, event_id=str(event_id), user_id=row.user_id,
                     grant_key=row.key, row_amount=row.amount,
                     event_amount=sum(f.amount for f in flows) if flows else None)
        )  # fmt: skip
    return found


def _finding(campaign_id: str, problem: str, **details: object) -> Finding:
    return Finding(
        kind="campaign_budget",
        payment_id=campaign_stream_id(campaign_id),
        details={"campaign_id": campaign_id, "problem": problem, **details},
    )


# -- the read side's figures -----------------------------------------------------------------------


async def check_figures(ctx: RunContext, upper: uuid.UUID, *, dry_run: bool) -> list[Finding]:
    """The ``campaign_totals`` findings: each campaign's figures on the read side against the
    grant rows recorded before ``upper`` (the run's upper bound: all of them published); a
    campaign that differs twice is reckoned exactly, under the projector's locks, and what
    still differs then is a finding, rewritten (unless ``dry_run``)."""
    want = await asyncio.to_thread(ctx.in_write, lambda c: _figures_before(c, upper))
    wrong = await asyncio.to_thread(_differing, ctx, want)
    if wrong and ctx.settings.reconcile_confirm_seconds > 0:
        await ctx.sleep(ctx.settings.reconcile_confirm_seconds)  # projector lag is not drift
        wrong = await asyncio.to_thread(_differing, ctx, want, set(wrong))
    if not wrong:
        return []
    ctx.checkpoint()
    exact = await asyncio.to_thread(_reckon, ctx, sorted(wrong), dry_run)
    return [
        Finding(
            kind="campaign_totals",
            payment_id=campaign_stream_id(c),
            details={"campaign_id": c, **detail},
            repaired=not dry_run,
        )
        for c, detail in sorted(exact.items())
    ]


def _figures_before(conn: sa.Connection, upper: uuid.UUID) -> dict[str, tuple[int, int]]:
    """Each campaign's figures as the projector shows them once it has applied everything
    recorded before ``upper``: its grants (their rows), less what came back of them (the
    take-backs' wallet events: a take-back's row holds what was due, which the wallet may have
    given only part of)."""
    g = reward_grants.c
    rows = conn.execute(
        sa.select(g.campaign_id, g.user_id, g.grant_key, g.amount).where(g.event_id < upper)
    ).all()
    figures: dict[str, tuple[int, int]] = {}
    for campaign_id, _user_id, _key, amount in rows:
        if amount > 0:
            total, count = figures.get(str(campaign_id), (0, 0))
            figures[str(campaign_id)] = (total + int(amount), count + 1)
    for back in _taken_back(conn, rows):
        if back.event_id < upper:
            total, count = figures.get(back.campaign_id, (0, 0))
            figures[back.campaign_id] = (total - back.amount, count)
    return figures


@dataclass(frozen=True, slots=True)
class _Back:
    campaign_id: str
    user_id: str
    amount: int
    event_id: uuid.UUID
    version: int


def _taken_back(conn: sa.Connection, rows: Iterable[Any]) -> list[_Back]:
    """The ``RewardTakenBack`` events of the users and campaigns that ``rows`` (of
    ``reward_grants``) hold take-backs of: every take-back (and every debt paid off later) is
    in the wallet of a user with a take-back row, read by primary-key ranges of those wallets."""
    wanted = {(str(r.campaign_id), str(r.user_id)) for r in rows if is_take_back(str(r.grant_key))}
    users = sorted({user for _, user in wanted})
    w = wallet_events.c
    found = []
    for first in range(0, len(users), CHUNK):
        query = sa.select(w.user_id, w.version, w.event_id, w.body).where(
            w.user_id.in_(users[first : first + CHUNK]), w.event_type == "RewardTakenBack"
        )
        for user_id, version, event_id, body in conn.execute(query):
            event = parse_wallet_event(body)
            if isinstance(event, RewardTakenBack):
                key = (event.payload.campaign_id, str(user_id))
                if key in wanted:
                    found.append(_Back(key[0], key[1], event.payload.amount, event_id, version))
    return found


def _shown(conn: sa.Connection, campaign_ids: Collection[str] | None) -> dict[str, tuple[int, int]]:
    t = read.campaign_totals.c
    query = sa.select(t.campaign_id, t.granted_amount, t.grants_count)
    if campaign_ids is not None:
        query = query.where(t.campaign_id.in_(sorted(campaign_ids)))
    return {str(c): (int(a), int(n)) for c, a, n in conn.execute(query)}


def _compare(
    want: Mapping[str, tuple[int, int]], have: Mapping[str, tuple[int, int]]
) -> dict[str, dict[str, object]]:
    """The campaigns whose figures differ (a campaign one side has no figures of: ``(0, 0)``
    there), with both sides'."""
    wrong: dict[str, dict[str, object]] = {}
    for campaign_id in sorted(set(want) | set(have)):
        right, shown = want.get(campaign_id, (0, 0)), have.get(campaign_id, (0, 0))
        if right != shown:
            wrong[campaign_id] = {
                "write_granted": right[0],
                "read_granted": shown[0],
                "write_grants": right[1],
                "read_grants": shown[1],
            }
    return wrong


def _differing(
    ctx: RunContext, want: Mapping[str, tuple[int, int]], only: set[str] | None = None
) -> dict[str, dict[str, object]]:
    """The campaigns (of ``only``; None: every one either side has) whose figures on the read
    side are not ``want``."""
    if only is not None:
        want = {c: figures for c, figures in want.items() if c in only}
    return _compare(want, ctx.in_read(lambda c: _shown(c, only)))


def _reckon(
    ctx: RunContext, campaign_ids: list[str], dry_run: bool
) -> dict[str, dict[str, object]]:
    """The campaigns whose figures are not what the projector has applied of their grants
    (the rows whose wallet movement is at or below its wallet's version on the read side),
    read under its offset locks, so no batch interleaves; rewritten to it unless
    ``dry_run``. The grants it applies later add themselves."""
    g, w = reward_grants.c, wallet_events.c
    with ctx.read.begin() as conn:
        locks.lock_projector(conn, ctx.settings.topic)
        with ctx.write.connect() as source:
            grants = source.execute(
                sa.select(g.campaign_id, g.user_id, g.grant_key, g.amount, g.event_id).where(
                    g.campaign_id.in_(campaign_ids)
                )
            ).all()
            ids = sorted({row.event_id for row in grants})
            versions: dict[uuid.UUID, int] = {}
            for first in range(0, len(ids), CHUNK):
                query = sa.select(w.event_id, w.version).where(
                    w.event_id.in_(ids[first : first + CHUNK])
                )
                versions.update((i, int(v)) for i, v in source.execute(query))
            backs = _taken_back(source, grants)
        applied = applied_versions(conn, sorted({str(row.user_id) for row in grants}))
        figures = dict.fromkeys(campaign_ids, (0, 0))
        for campaign_id, user_id, _key, amount, event_id in grants:
            version = versions.get(event_id)
            if amount < 0 or version is None or version > applied.get(str(user_id), 0):
                continue
            total, count = figures[str(campaign_id)]
            figures[str(campaign_id)] = (total + int(amount), count + 1)
        for back in backs:
            if back.version <= applied.get(back.user_id, 0) and back.campaign_id in figures:
                total, count = figures[back.campaign_id]
                figures[back.campaign_id] = (total - back.amount, count)
        wrong = _compare(figures, _shown(conn, campaign_ids))
        if wrong and not dry_run:
            upsert_rows(
                conn, read.campaign_totals, ("campaign_id", *GRANTED),
                [(c, *figures[c]) for c in sorted(wrong)], replace=GRANTED,
            )  # fmt: skip
    return wrong
