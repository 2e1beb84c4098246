"""The reconciler's own rows in the read database: its runs, their findings, and the single
state row holding the watermark and the lock that keeps one run at a time across instances.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.schema.read import reconciler_state, reconciliation_findings, reconciliation_runs

STATE_ID = 1


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    payment_id: uuid.UUID | None = None
    merchant_id: str | None = None
    details: dict[str, object] | None = None
    repaired: bool = False


SCOPE_SLACK = timedelta(seconds=1)
"""An event's id is taken just after its ``occurred_at`` (the id's clock never runs ahead):
within this of it, with room to spare."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What a run checks: every event (``after`` None), or the events recorded after ``after``
    (an incremental run's watermark minus the safety margin). "consistent" means consistent
    within it."""

    after: datetime | None = None

    @property
    def text(self) -> str:
        """``everything``, or ``events recorded after 2026-12-02T07:30:00.123Z``: as recorded."""
        if self.after is None:
            return "everything"
        moment = self.after.astimezone(UTC).isoformat(timespec="milliseconds")
        return f"events recorded after {moment.replace('+00:00', 'Z')}"

    def covers(self, start: datetime) -> bool:
        """Whether every event at or after ``start`` (aware) was recorded within the scope."""
        return self.after is None or start >= self.after + SCOPE_SLACK


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: int
    started_at: datetime
    finished_at: datetime | None
    mode: str
    dry_run: bool
    watermark_from: str | None
    watermark_to: str | None
    payments_checked: int
    findings_count: int
    repaired_count: int
    outcome: str | None
    error: str | None
    scope: str | None
    """``everything`` or ``events recorded after ...``; None for runs recorded before scopes
    were (or while a run is starting)."""


class LockHeld(RuntimeError):
    """Another reconciler run holds the lock."""


def _ensure_state_row(conn: sa.Connection, now: datetime) -> None:
    exists = conn.execute(
        sa.select(reconciler_state.c.state_id).where(reconciler_state.c.state_id == STATE_ID)
    ).first()
    if exists is None:
        try:
            with conn.begin_nested():
                conn.execute(reconciler_state.insert().values(state_id=STATE_ID, updated_at=now))
        except sa.exc.IntegrityError:
            pass  # another instance inserted it first


def acquire_lock(engine: Engine, owner: str, ttl_seconds: float) -> str | None:
    """Take (or renew) the lock; return the stored watermark. Raise ``LockHeld`` otherwise."""
    now = utcnow()
    with engine.begin() as conn:
        _ensure_state_row(conn, now)
        taken = conn.execute(
            reconciler_state.update()
            .where(
                reconciler_state.c.state_id == STATE_ID,
                sa.or_(
                    reconciler_state.c.lock_owner.is_(None),
                    reconciler_state.c.lock_owner == owner,
                    reconciler_state.c.lock_expires_at < now,
                ),
            )
            .values(
                lock_owner=owner,
                lock_expires_at=now + timedelta(seconds=ttl_seconds),
                updated_at=now,
            )
        ).rowcount
        row = conn.execute(
            sa.select(
                reconciler_state.c.watermark,
                reconciler_state.c.lock_owner,
                reconciler_state.c.lock_expires_at,
            ).where(reconciler_state.c.state_id == STATE_ID)
        ).one()
    if taken != 1:
        raise LockHeld(f"another run ({row.lock_owner}) holds the lock until {row.lock_expires_at}")
    watermark: str | None = row.watermark
    return watermark


def release_lock(engine: Engine, owner: str, *, watermark: str | None = None) -> None:
    """Release the lock; store ``watermark`` if given (only while still the holder)."""
    values: dict[str, object] = {
        "lock_owner": None,
        "lock_expires_at": None,
        "updated_at": utcnow(),
    }
    if watermark is not None:
        values["watermark"] = watermark
    with engine.begin() as conn:
        conn.execute(
            reconciler_state.update()
            .where(reconciler_state.c.state_id == STATE_ID, reconciler_state.c.lock_owner == owner)
            .values(**values)
        )


def start_run(
    engine: Engine,
    *,
    mode: str,
    dry_run: bool,
    watermark_from: str | None,
    started_at: datetime,
    scope: Scope,
) -> int:
    with engine.begin() as conn:
        result = conn.execute(
            reconciliation_runs.insert().values(
                started_at=started_at,
                mode=mode,
                dry_run=dry_run,
                scope=scope.text,
                watermark_from=watermark_from,
                payments_checked=0,
                findings_count=0,
                repaired_count=0,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def finish_run(
    engine: Engine,
    run_id: int,
    *,
    outcome: str,
    watermark_to: str | None,
    payments_checked: int,
    findings: Sequence[Finding],
    error: str | None = None,
) -> None:
    with engine.begin() as conn:
        if findings:
            conn.execute(
                reconciliation_findings.insert(),
                [
                    {
                        "run_id": run_id,
                        "seq": seq,
                        "kind": f.kind,
                        "payment_id": f.payment_id,
                        "merchant_id": f.merchant_id,
                        "details": orjson.dumps(
                            f.details or {}, option=orjson.OPT_SORT_KEYS, default=str
                        ).decode(),
                        "repaired": f.repaired,
                    }
                    for seq, f in enumerate(findings, start=1)
                ],
            )
        conn.execute(
            reconciliation_runs.update()
            .where(reconciliation_runs.c.run_id == run_id)
            .values(
                finished_at=utcnow(),
                outcome=outcome,
                watermark_to=watermark_to,
                payments_checked=payments_checked,
                findings_count=len(findings),
                repaired_count=sum(1 for f in findings if f.repaired),
                error=None if error is None else error[:2000],
            )
        )


def recent_runs(engine: Engine, limit: int = 20) -> list[RunRecord]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(reconciliation_runs)
            .order_by(reconciliation_runs.c.run_id.desc())
            .limit(limit)
        )
        return [
            RunRecord(
                run_id=r.run_id,
                started_at=r.started_at,
                finished_at=r.finished_at,
                mode=r.mode,
                dry_run=bool(r.dry_run),
                watermark_from=r.watermark_from,
                watermark_to=r.watermark_to,
                payments_checked=int(r.payments_checked),
                findings_count=int(r.findings_count),
                repaired_count=int(r.repaired_count),
                outcome=r.outcome,
                error=r.error,
                scope=r.scope,
            )
            for r in rows
        ]


COMPLETED = ("consistent", "drift")
"""A run that went through to the end: it checked its whole scope (drift or not)."""


def last_completed(engine: Engine, *, mode: str) -> datetime | None:
    """When the last completed, non-dry run of ``mode`` started (None: never): what the full
    audit's schedule and the last-success metric count from."""
    r = reconciliation_runs.c
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            sa.select(sa.func.max(r.started_at)).where(
                r.mode == mode, r.outcome.in_(COMPLETED), r.dry_run.is_(False)
            )
        ).scalar_one_or_none()
    if value is not None and value.tzinfo is None:  # aggregates lose the column type
        value = value.replace(tzinfo=UTC)
    return value
