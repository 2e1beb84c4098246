"""Phase 1 of a run, find: what the run starts from, which payments differ between the write
store and the read side, and which read rows have no payment behind them.

Reads only. Every query runs on a connection of its own, outside any explicit transaction
(each block reads its two databases on one connection pair, returned when the block is done),
so this phase holds no lock a projector batch could wait for. What it guarantees: every
payment with an event in the scope (a full audit: every payment), except those still in the
outbox, has been compared; every payment in ``Found.suspects`` differed at first sight, every
other one matched (by fingerprints or payment by payment); ``Found.orphans`` are read rows the
write store has no payment for.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from kessai.clock import utcnow
from kessai.ids import bound_at
from kessai.schema import read, write
from reconciler import fingerprints, loaders, totals
from reconciler.campaigns import is_campaign_stream
from reconciler.compare import compare_loaded
from reconciler.context import ProgressCallback, RunContext
from reconciler.records import Finding
from reconciler.wallets import is_registration_stream, is_wallet_stream

CHUNKS_IN_FLIGHT = 2
"""Blocks compared at once (MySQL/MariaDB): while one waits for a database, another is worked
on."""


@dataclass(frozen=True, slots=True)
class Start:
    """What a run sees first, and keeps to the end."""

    outbox: loaders.OutboxView
    upper: uuid.UUID
    """The run's upper bound: its start, but never past an event still in the outbox (the next
    run's watermark)."""
    parked: list[tuple[uuid.UUID, int, str]]
    letters: list[tuple[int, uuid.UUID | None, int | None, str]]
    zones: dict[str, ZoneInfo]
    fallback: ZoneInfo

    @property
    def flagged(self) -> set[uuid.UUID]:
        """Payments with a parked event or an open dead letter: checked whatever the scope.
        (Wallet streams' are checked with their wallets, ``reconciler.wallets``; registrations'
        and campaigns' are no payments.)"""
        flagged = {pid for pid, _, _ in self.parked} | {pid for _, pid, _, _ in self.letters}
        return {
            pid
            for pid in flagged
            if pid is not None
            and not is_wallet_stream(pid)
            and not is_registration_stream(pid)
            and not is_campaign_stream(pid)
        }


def look_around(ctx: RunContext) -> Start:
    """The outbox, the run's bounds, parked events, dead letters and merchant zones (each read
    on a connection of its own)."""
    s = ctx.settings
    now = utcnow()
    stuck_before = now - timedelta(seconds=s.reconcile_outbox_stuck_seconds)
    outbox = ctx.in_write(lambda c: loaders.outbox_view(c, stuck_before))
    upper = bound_at(now)
    if outbox.oldest_event_id is not None:
        upper = min(upper, outbox.oldest_event_id)
    parked, letters = ctx.in_read(loaders.parked_and_dead_letters)
    zones = ctx.in_read(lambda c: totals.zone_lookup(c, s.default_merchant_time_zone))
    return Start(
        outbox=outbox,
        upper=upper,
        parked=parked,
        letters=letters,
        zones=zones,
        fallback=ZoneInfo(s.default_merchant_time_zone),
    )


@dataclass(slots=True)
class Found:
    suspects: dict[uuid.UUID, Finding] = field(default_factory=dict)
    """Payments that differed, by payment id (not confirmed yet: the projector may be late)."""
    orphans: list[loaders.Orphan] = field(default_factory=list)


async def find(
    ctx: RunContext,
    *,
    lower: uuid.UUID | None,
    start: Start,
    counted: Callable[[int], None],
    progress: ProgressCallback | None,
) -> Found:
    """Compare every payment in scope, block by block, and look for orphans alongside.
    ``counted``: told how many payments each block checks, as it is sent."""
    blocks = _Blocks(ctx, start, counted)
    looking: asyncio.Task[list[loaders.Orphan]] | None = None
    if ctx.parallel:
        looking = asyncio.create_task(asyncio.to_thread(find_orphans, ctx, lower))
    try:
        if lower is None:
            await _every_payment(ctx, blocks, progress)
        else:
            await _payments_since(ctx, blocks, lower, start.flagged, progress)
        await blocks.drain()
    finally:
        blocks.cancel()
        if looking is not None and not looking.done():
            with contextlib.suppress(BaseException):
                await looking
    if looking is not None:
        orphans = looking.result()
    else:
        orphans = await asyncio.to_thread(find_orphans, ctx, lower)
    return Found(suspects=blocks.suspects, orphans=orphans)


def block_size(ctx: RunContext) -> int:
    return max(ctx.settings.reconcile_chunk_size, fingerprints.FINGERPRINT_PAGE)


async def _every_payment(
    ctx: RunContext, blocks: _Blocks, progress: ProgressCallback | None
) -> None:
    """A full audit: every payment of the write store, in keyset pages (each a key range)."""
    total = await asyncio.to_thread(ctx.in_write, loaders.count_payments)
    if progress:
        progress(0, total)
    done = 0
    after: bytes | None = None
    size = block_size(ctx)
    while chunk := await asyncio.to_thread(_next_keys, ctx, after, size):
        after = chunk[-1]
        await blocks.check(chunk, whole_range=True)
        done += len(chunk)
        if ctx.pause_seconds > 0:
            await ctx.sleep(ctx.pause_seconds)
        ctx.checkpoint()
        if progress:
            progress(done, total)


def _next_keys(ctx: RunContext, after: bytes | None, size: int) -> list[bytes]:
    with ctx.write.connect() as conn:
        return loaders.payment_keys_after(conn, after, size)


async def _payments_since(
    ctx: RunContext,
    blocks: _Blocks,
    lower: uuid.UUID,
    flagged: set[uuid.UUID],
    progress: ProgressCallback | None,
) -> None:
    """An incremental run: the payments with an event at or after ``lower``, and ``flagged``."""
    keys = await asyncio.to_thread(ctx.in_write, lambda c: loaders.payment_keys_since(c, lower))
    ordered = sorted(keys | {pid.bytes for pid in flagged})
    if progress:
        progress(0, len(ordered))
    size = block_size(ctx)
    for first in range(0, len(ordered), size):
        await blocks.check(ordered[first : first + size])
        ctx.checkpoint()
        if progress:
            progress(min(first + size, len(ordered)), len(ordered))


class _Blocks:
    """Blocks of payments being compared, at most ``CHUNKS_IN_FLIGHT`` at once (one on
    SQLite)."""

    def __init__(self, ctx: RunContext, start: Start, counted: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.in_flight = {pid.bytes for pid in start.outbox.in_flight}
        self.counted = counted
        self.at_most = CHUNKS_IN_FLIGHT if ctx.parallel else 1
        self.tasks: set[asyncio.Task[None]] = set()
        self.suspects: dict[uuid.UUID, Finding] = {}

    async def check(self, chunk: Sequence[bytes], *, whole_range: bool = False) -> None:
        """``chunk``: sorted payment keys (``loaders.key_of``). ``whole_range``: it is every
        write-store payment from its first to its last key (a keyset page), so it is a key
        range unless something was left out. Payments still in the outbox are left out."""
        kept = [key for key in chunk if key not in self.in_flight]
        if not kept:
            return
        self.counted(len(kept))
        key_range = (len(kept) == len(chunk)) if whole_range else None
        while len(self.tasks) >= self.at_most:
            await self._one_done()
        self.tasks.add(asyncio.create_task(self._checked(kept, key_range)))

    async def drain(self) -> None:
        while self.tasks:
            await self._one_done()

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _checked(self, chunk: list[bytes], key_range: bool | None) -> None:
        self.suspects.update(await asyncio.to_thread(check_chunk, self.ctx, chunk, key_range))

    async def _one_done(self) -> None:
        done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        self.tasks.difference_update(done)
        for task in done:
            task.result()


def check_chunk(
    ctx: RunContext, chunk: Sequence[bytes], key_range: bool | None
) -> dict[uuid.UUID, Finding]:
    """Fingerprints of the chunk on both sides; payment by payment only where they differ
    (first in pieces of ``KESSAI_RECONCILE_CHUNK_SIZE``, fingerprinted again). ``chunk`` is
    sorted and distinct; ``key_range`` None: find out."""
    size = ctx.settings.reconcile_chunk_size
    with ctx.write.connect() as wconn, ctx.read.connect() as rconn:
        if key_range is None:
            key_range = fingerprints.is_key_range(wconn, chunk)
        pieces = [chunk] if len(chunk) <= size else _pieces(chunk, size)
        if len(pieces) > 1 and fingerprints.same(wconn, rconn, chunk, key_range=key_range):
            return {}
        found: dict[uuid.UUID, Finding] = {}
        for piece in pieces:
            # The pieces of a key range are key ranges too.
            if fingerprints.same(wconn, rconn, piece, key_range=key_range):
                continue
            ids = [uuid.UUID(bytes=key) for key in piece]
            events, rows = loaders.load_events(wconn, ids), loaders.load_read(rconn, ids)
            found.update(compare_loaded(ids, events, rows))
        return found


def _pieces(chunk: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [chunk[first : first + size] for first in range(0, len(chunk), size)]


def compare_payments(ctx: RunContext, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Finding]:
    """Payment by payment, without fingerprints (a few payments: suspects, repairs)."""
    if not ids:
        return {}
    with ctx.write.connect() as wconn:
        events = loaders.load_events(wconn, ids)
    with ctx.read.connect() as rconn:
        rows = loaders.load_read(rconn, ids)
    return compare_loaded(ids, events, rows)


def find_orphans(ctx: RunContext, lower: uuid.UUID | None) -> list[loaders.Orphan]:
    """Read payments (and refund rows alone) at or above ``lower`` (None: all) that have no
    event in the write store. Certain at first sight: a read row exists only after its event
    committed, so there is no lag to wait out."""
    page = max(ctx.settings.reconcile_chunk_size, 1)
    candidates: list[uuid.UUID] = []
    with ctx.read.connect() as rconn, ctx.write.connect() as wconn:
        after: uuid.UUID | None = None
        if page > 1:
            after = _unknown_in_fingerprinted_pages(rconn, wconn, lower, page, candidates)
        while ids := loaders.read_payment_ids(rconn, lower=lower, after=after, limit=page):
            after = ids[-1]
            candidates += sorted(set(ids) - loaders.known_payments(wconn, ids))
        alone = sorted(loaders.refunds_without_payment(rconn, lower))
        for first in range(0, len(alone), page):
            chunk = alone[first : first + page]
            candidates += sorted(set(chunk) - loaders.known_payments(wconn, chunk))
        orphans: list[loaders.Orphan] = []
        for first in range(0, len(candidates), page):
            orphans += loaders.load_orphans(rconn, candidates[first : first + page])
    return orphans


def _unknown_in_fingerprinted_pages(
    rconn: sa.Connection,
    wconn: sa.Connection,
    lower: uuid.UUID | None,
    page: int,
    into: list[uuid.UUID],
) -> uuid.UUID | None:
    """Walk the read payment ids in fingerprinted pages (larger ones, fewer round trips): a page
    whose ids fingerprint the same on both sides holds no orphan and is skipped without
    reading its ids; the ids of the others the write store does not know go ``into``. Returns
    where the last whole page ended (the rest is read id by id)."""
    size = max(page, fingerprints.FINGERPRINT_PAGE)
    after: uuid.UUID | None = None
    while last := fingerprints.read_page_end(rconn, lower=lower, after=after, size=size):
        here = fingerprints.ids_fingerprint(
            rconn, read.payments, lower=lower, after=after, last=last
        )
        there = fingerprints.ids_fingerprint(
            wconn, write.events, lower=lower, after=after, last=last
        )
        if here != there:
            into += fingerprints.unknown_between(rconn, wconn, lower=lower, after=after, last=last)
        after = last
    return after


async def confirm(ctx: RunContext, found: Found, start: Start) -> list[Finding]:
    """The findings about payments and the outbox, after a second look at what differed: what
    the projector was merely late with is not drift. Reads only."""
    s = ctx.settings
    suspects, parked, letters = found.suspects, start.parked, start.letters
    if (suspects or parked or letters) and s.reconcile_confirm_seconds > 0:
        await ctx.sleep(s.reconcile_confirm_seconds)
        suspects = await asyncio.to_thread(compare_payments, ctx, sorted(suspects))
        parked, letters = await asyncio.to_thread(ctx.in_read, loaders.parked_and_dead_letters)
    in_flight = start.outbox.in_flight
    findings: list[Finding] = sorted(suspects.values(), key=lambda f: str(f.payment_id))
    findings += [
        Finding(kind="parked", payment_id=pid, details={"version": v, "reason": reason})
        for pid, v, reason in parked
        if pid not in in_flight
    ]
    findings += [
        Finding(
            kind="dead_letter",
            payment_id=pid,
            details={"dead_letter_id": i, "version": v, "reason": reason},
        )
        for i, pid, v, reason in letters
        if pid is None or pid not in in_flight
    ]
    if start.outbox.stuck_count:
        findings.append(
            Finding(
                kind="outbox_stuck",
                details={
                    "rows": start.outbox.stuck_count,
                    "oldest_created_at": start.outbox.oldest_created_at,
                    "older_than_seconds": s.reconcile_outbox_stuck_seconds,
                },
            )
        )
    return findings
