"""Phase 2 of a run, repair: bring the read side back to the fold of the write store.

Re-publish every event of each payment found wrong (``reconciler.republish``), after removing
the read rows of those wrong at their own version (else the projector would skip the events as
duplicates), and wait until the read side matches; remove orphan rows. Each removal is one
read-database transaction that first takes the projector's offset locks and, for reset payments,
takes out of the totals what re-applying their events will add back, in that same transaction:
a total that was right stays right. Guarantees: a payment finding is ``repaired`` only once the
read side was seen equal to the fold after the re-publish; ``Repaired.touched`` says where the
changed read rows counted in the totals, for the totals phase to check. A dry run repairs
nothing and reports the same findings.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

import sqlalchemy as sa

from kessai.schema import read, write
from reconciler import loaders, sums, totals
from reconciler.campaigns import is_campaign_stream
from reconciler.context import RunContext
from reconciler.find import compare_payments
from reconciler.records import Finding
from reconciler.republish import republisher
from reconciler.wallets import is_registration_stream, is_wallet_stream

PAYMENT_KINDS = {"missing", "mismatch", "parked", "dead_letter"}


@dataclass(slots=True)
class Repaired:
    findings: list[Finding]
    """The findings given, with ``repaired`` and ``merchant_id`` filled in, and the orphans'."""
    unresolved: set[uuid.UUID] = field(default_factory=set)
    """Payments still wrong when the wait ran out."""
    touched: dict[str, list[datetime]] = field(default_factory=dict)
    """Where the repairs changed read rows: (merchant, moments) whose totals they may move."""


async def repair(
    ctx: RunContext,
    findings: list[Finding],
    orphans: list[loaders.Orphan],
    *,
    dry_run: bool,
) -> Repaired:
    """Repair what ``findings`` and ``orphans`` say is wrong (nothing in a ``dry_run``)."""
    done = Repaired(findings=list(findings))
    if not dry_run:
        ctx.checkpoint()
        done.findings, done.unresolved, republished = await republish(ctx, findings)
        for event in republished:
            done.touched.setdefault(event.merchant_id, []).append(event.occurred_at)
        if orphans:
            await asyncio.to_thread(delete_read_rows, ctx, sorted(o.payment_id for o in orphans))
            for o in orphans:
                done.touched.setdefault(o.merchant_id, []).extend(o.moments)
    done.findings += [
        Finding(
            kind="orphan",
            payment_id=o.payment_id,
            merchant_id=o.merchant_id,
            details={
                "captured_amount": o.captured_amount,
                "refunded_amount": o.refunded_amount,
                "version": o.version,
            },
            repaired=not dry_run,
        )
        for o in orphans
    ]
    return done


async def republish(
    ctx: RunContext, findings: list[Finding]
) -> tuple[list[Finding], set[uuid.UUID], list[sums.EventRow]]:
    """Re-publish the affected payments and wait until the read side matches. Returns the
    findings marked, the payments still wrong, and the re-published events (where the totals
    may move)."""
    targets = sorted(
        {
            f.payment_id
            for f in findings
            if f.kind in PAYMENT_KINDS
            and f.payment_id
            and not is_wallet_stream(f.payment_id)
            and not is_registration_stream(f.payment_id)
            and not is_campaign_stream(f.payment_id)
        }
    )
    if not targets:
        return findings, set(), []
    size = ctx.settings.reconcile_chunk_size
    bodies = await asyncio.to_thread(ctx.in_write, lambda c: _bodies(c, targets, size))
    known = {row[0] for row in bodies}
    republished = await asyncio.to_thread(
        ctx.in_write, lambda c: sums.events_one_by_one(c, since=None, payment_ids=known)
    )
    reset = sorted(
        f.payment_id
        for f in findings
        if f.payment_id in known
        and ((f.kind == "mismatch" and (f.details or {}).get("reset")) or f.kind == "missing")
    )
    async with republisher(ctx.settings) as send:
        if reset:
            resetting = set(reset)
            events = [e for e in republished if e.payment_id in resetting]
            await asyncio.to_thread(delete_read_rows, ctx, reset, events)
        await send(bodies)
    remaining = await _wait_until_right(ctx, known)
    targets_set = set(targets)
    merchants = await asyncio.to_thread(merchants_of, ctx, sorted(known))
    marked = [
        replace(
            f,
            repaired=f.payment_id in known and f.payment_id not in remaining,
            merchant_id=f.merchant_id or merchants.get(f.payment_id),
        )
        if f.kind in PAYMENT_KINDS and f.payment_id is not None and f.payment_id in targets_set
        else f
        for f in findings
    ]
    return marked, remaining, republished


async def _wait_until_right(ctx: RunContext, payment_ids: set[uuid.UUID]) -> set[uuid.UUID]:
    """Look again every 0.2 s until none of ``payment_ids`` differs, or the verify timeout
    passes; return those still wrong."""
    return await ctx.wait_until_right(payment_ids, lambda keys: still_wrong(ctx, keys))


def delete_read_rows(
    ctx: RunContext,
    payment_ids: list[uuid.UUID],
    compensate: list[sums.EventRow] | None = None,
) -> None:
    """Remove read rows (payment and refunds) in one read-database transaction, under the
    projector's offset locks. ``compensate``: the events of those payments that the projector
    will apply again, taken out of the totals in the same transaction, so the totals end as
    they were (right ones stay right)."""
    size = ctx.settings.reconcile_chunk_size
    with ctx.read.begin() as conn:
        totals.lock_projector(conn, ctx.settings.topic)
        if compensate:
            totals.compensate(
                conn, compensate, default_zone=ctx.settings.default_merchant_time_zone
            )
        for first in range(0, len(payment_ids), size):
            chunk = payment_ids[first : first + size]
            conn.execute(read.refunds.delete().where(read.refunds.c.payment_id.in_(chunk)))
            conn.execute(read.payments.delete().where(read.payments.c.payment_id.in_(chunk)))


def still_wrong(ctx: RunContext, payment_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``payment_ids`` still differ, or still have a parked event or an open dead
    letter."""
    wrong = set(compare_payments(ctx, payment_ids))
    pe, dl = read.parked_events.c, read.dead_letters.c
    with ctx.read.connect() as conn:
        wrong |= set(
            conn.execute(sa.select(pe.payment_id).where(pe.payment_id.in_(payment_ids))).scalars()
        )
        wrong |= set(
            conn.execute(
                sa.select(dl.payment_id).where(dl.payment_id.in_(payment_ids), dl.status == "open")
            ).scalars()
        )
    return wrong


def merchants_of(ctx: RunContext, payment_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    e = write.events.c
    with ctx.write.connect() as conn:
        return dict(
            conn.execute(
                sa.select(e.payment_id, e.merchant_id).where(
                    e.payment_id.in_(payment_ids), e.version == 1
                )
            ).all()
        )


def _bodies(conn: sa.Connection, ids: list[uuid.UUID], chunk: int) -> list[loaders.EventRow]:
    rows: list[loaders.EventRow] = []
    for first in range(0, len(ids), chunk):
        rows += loaders.load_bodies(conn, ids[first : first + chunk])
    return rows
