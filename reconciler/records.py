"""The reconciler's own rows in the read database: its runs (with what each concluded per
check), their findings, and the single state row holding the watermark, how far each check is
verified, and the lock that keeps one run at a time across instances.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.clock import utcnow
from kessai.schema.read import (
    RECONCILER_CHECKS,
    moment_of,
    moment_text,
    reconciler_state,
    reconciliation_findings,
    reconciliation_runs,
)

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


Verified = dict[str, datetime | None]
"""Per check (``RECONCILER_CHECKS``), the instant it is verified up to (None: never)."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a run concluded of one check: its findings, those left unrepaired, and the instant
    the check is verified up to after the run."""

    findings: int
    unrepaired: int
    verified_up_to: datetime | None


@dataclass(frozen=True, slots=True)
class State:
    """The state row as a run finds it when it takes the lock."""

    watermark: str | None
    verified: Verified


def verified_of(stored: Mapping[str, str | None] | None) -> Verified:
    """``reconciler_state.verified_up_to`` read back: every check, None where never verified."""
    return {name: moment_of((stored or {}).get(name)) for name in RECONCILER_CHECKS}


def _verified_json(verified: Verified) -> dict[str, str | None]:
    return {name: None if m is None else moment_text(m) for name, m in verified.items()}


def _checks_json(checks: Mapping[str, CheckResult]) -> dict[str, dict[str, object]]:
    return {
        name: {
            "findings": c.findings,
            "unrepaired": c.unrepaired,
            "verified_up_to": None if c.verified_up_to is None else moment_text(c.verified_up_to),
        }
        for name, c in checks.items()
    }


def checks_of(stored: Mapping[str, Mapping[str, Any]] | None) -> dict[str, CheckResult] | None:
    """``reconciliation_runs.checks`` read back (None: the run recorded none)."""
    if stored is None:
        return None
    return {
        name: CheckResult(
            findings=int(c["findings"]),
            unrepaired=int(c["unrepaired"]),
            verified_up_to=moment_of(c["verified_up_to"]),
        )
        for name, c in stored.items()
    }


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
    checks: dict[str, CheckResult] | None = None
    """Per check, what the run concluded; None for a run that did not complete (or recorded
    before checks were)."""


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


def acquire_lock(engine: Engine, owner: str, ttl_seconds: float) -> State:
    """Take (or renew) the lock; return the stored watermark and how far each check is
    verified. Raise ``LockHeld`` otherwise."""
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
                reconciler_state.c.verified_up_to,
                reconciler_state.c.lock_owner,
                reconciler_state.c.lock_expires_at,
            ).where(reconciler_state.c.state_id == STATE_ID)
        ).one()
    if taken != 1:
        raise LockHeld(f"another run ({row.lock_owner}) holds the lock until {row.lock_expires_at}")
    return State(watermark=row.watermark, verified=verified_of(row.verified_up_to))


def verified_up_to(engine: Engine) -> Verified:
    """How far each check is verified, as the last run that completed left it."""
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(reconciler_state.c.verified_up_to).where(
                reconciler_state.c.state_id == STATE_ID
            )
        ).scalar()
    return verified_of(stored)


def release_lock(
    engine: Engine,
    owner: str,
    *,
    watermark: str | None = None,
    verified: Verified | None = None,
) -> None:
    """Release the lock; store ``watermark`` and ``verified`` (every check's) if given, only
    while still the holder."""
    values: dict[str, object] = {
        "lock_owner": None,
        "lock_expires_at": None,
        "updated_at": utcnow(),
    }
    if watermark is not None:
        values["watermark"] = watermark
    if verified is not None:
        values["verified_up_to"] = _verified_json(verified)
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
    checks: Mapping[str, CheckResult] | None = None,
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
                checks=None if checks is None else _checks_json(checks),
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
                checks=checks_of(r.checks),
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
