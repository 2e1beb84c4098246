"""The query handlers: each runs in a worker thread and reads inside one read-only transaction
it owns (opened and ended here, never committed: there is nothing to commit).

They return plain dicts in the shapes of ``query_service.schemas``; the routes add freshness and
send them. The merchant summary is not here: its read, SQL and answer are one read view with its
route, in ``routes/summary.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kessai.schema.read import RECONCILER_CHECKS, moment_of
from query_service import repository
from query_service.cursor import Position
from query_service.repository import Condition


def payment_dict(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "payment_id": row.payment_id,
        "merchant_id": row.merchant_id,
        "user_id": row.user_id,
        "store_id": row.store_id,
        "order_ref": row.order_ref,
        "method": row.method,
        "currency": row.currency,
        "captured_amount": row.captured_amount,
        "refunded_amount": row.refunded_amount,
        "status": row.status,
        "version": row.version,
        "metadata": orjson.loads(row.metadata),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _refund_dict(row: sa.Row[Any]) -> dict[str, Any]:
    return {
        "refund_id": row.refund_id,
        "payment_id": row.payment_id,
        "merchant_id": row.merchant_id,
        "version": row.version,
        "amount": row.amount,
        "currency": row.currency,
        "reason": row.reason,
        "created_at": row.created_at,
    }


def payment_detail(*, engine: Engine, payment_id: uuid.UUID) -> dict[str, Any] | None:
    """The payment and its refunds, read in one snapshot; ``None`` if it is not projected."""
    with engine.connect() as conn:
        row = repository.payment(conn, payment_id)
        if row is None:
            return None
        refund_rows = repository.refunds_of(conn, payment_id)
    return {**payment_dict(row), "refunds": [_refund_dict(r) for r in refund_rows]}


def position_of(row: sa.Row[Any]) -> Position:
    return Position(created_at=row.created_at, payment_id=row.payment_id)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_position: Position | None
    """Where the next page starts; ``None`` when this page is the last."""


def payments_page(
    *, engine: Engine, where: Sequence[Condition], limit: int, after: Position | None
) -> Page:
    """One page of payments, newest first. Reads one row more than ``limit`` to know whether
    another page follows, so the last page never hands out a cursor to an empty one."""
    with engine.connect() as conn:
        rows = repository.payments_page(conn, where, after_position=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(
        items=[payment_dict(r) for r in rows],
        next_position=position_of(rows[-1]) if more and rows else None,
    )


def balance(*, engine: Engine, user_id: str) -> dict[str, Any]:
    """The user's balance; a user nothing has moved money for yet has an empty wallet (balance
    0, no currency, version 0), never an error: the read side cannot tell a new user from an
    unknown one, and both hold nothing."""
    with engine.connect() as conn:
        row = repository.wallet(conn, user_id)
    if row is None:
        return {"user_id": user_id, "balance": 0, "currency": None, "version": 0}
    return {
        "user_id": user_id,
        "balance": row.balance,
        "currency": row.currency,
        "version": row.version,
    }


@dataclass(frozen=True, slots=True)
class StatementPage:
    items: list[dict[str, Any]]
    next_version: int | None
    """The version the page ended at, where the next (older) page starts; ``None`` when this
    page is the last."""


def statement_page(
    *, engine: Engine, user_id: str, limit: int, before_version: int | None
) -> StatementPage:
    """One page of the user's wallet movements, newest first (one row more is read to know
    whether another page follows)."""
    with engine.connect() as conn:
        rows = repository.statement_page(
            conn, user_id, before_version=before_version, limit=limit + 1
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return StatementPage(
        items=[
            {
                "version": r.version,
                "kind": r.kind,
                "amount": r.amount,
                "currency": r.currency,
                "balance_after": r.balance_after,
                "payment_id": r.payment_id,
                "refund_id": r.refund_id,
                "top_up_id": r.top_up_id,
                "merchant_id": r.merchant_id,
                "source": r.source,
                "reference": r.reference,
                "recorded_at": r.recorded_at,
                "campaign_id": r.campaign_id,
            }
            for r in rows
        ],
        next_version=rows[-1].version if more and rows else None,
    )


def count_matching(*, engine: Engine, where: Sequence[Condition], cap: int) -> int:
    with engine.connect() as conn:
        return repository.count_up_to(conn, where, cap)


def export_rows(
    *, engine: Engine, where: Sequence[Condition], after: Position | None, size: int
) -> Sequence[sa.Row[Any]]:
    """One chunk of an export: its own short transaction, so a long download holds no
    connection and no snapshot between chunks."""
    with engine.connect() as conn:
        return repository.payments_page(conn, where, after_position=after, limit=size)


def ping(*, engine: Engine) -> None:
    """Fails unless the read database answers and holds the read model."""
    with engine.connect() as conn:
        repository.probe(conn)


def merchant_time_zone(*, engine: Engine, merchant_id: str) -> str | None:
    with engine.connect() as conn:
        return repository.merchant_time_zone(conn, merchant_id)


def read_as_of(*, engine: Engine, topic: str) -> datetime | None:
    """How fresh the read side is: per partition, the later of its last applied event and the
    last moment the projector was at its end; then the oldest partition. ``None`` when no
    partition has either (nothing was ever projected)."""
    with engine.connect() as conn:
        positions = repository.projector_positions(conn, topic)
    per_partition = [
        max(stamps)
        for stamps in ([s for s in pair if s is not None] for pair in positions)
        if stamps
    ]
    return min(per_partition) if per_partition else None


def reconciliation_runs(*, engine: Engine, before: int | None, limit: int) -> dict[str, Any]:
    """Recorded reconciliation runs (newest first) with their findings."""
    with engine.connect() as conn:
        runs = repository.reconciliation_runs_page(conn, before=before, limit=limit)
        findings = repository.reconciliation_findings_of(conn, [r.run_id for r in runs])
        verified = repository.reconciler_verified_up_to(conn) or {}
    by_run: dict[int, list[dict[str, Any]]] = {}
    for f in findings:
        by_run.setdefault(f.run_id, []).append(
            {
                "kind": f.kind,
                "payment_id": f.payment_id,
                "merchant_id": f.merchant_id,
                "details": orjson.loads(f.details),
                "repaired": bool(f.repaired),
            }
        )
    items = [
        {
            "run_id": r.run_id,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "mode": r.mode,
            "scope": r.scope,
            "dry_run": bool(r.dry_run),
            "watermark_from": r.watermark_from,
            "watermark_to": r.watermark_to,
            "payments_checked": int(r.payments_checked),
            "findings_count": int(r.findings_count),
            "repaired_count": int(r.repaired_count),
            "outcome": r.outcome,
            "error": r.error,
            "checks": _run_checks(r.checks),
            "findings": by_run.get(r.run_id, []),
        }
        for r in runs
    ]
    next_before = runs[-1].run_id if len(runs) == limit else None
    return {
        "verified_up_to": {c: moment_of(verified.get(c)) for c in RECONCILER_CHECKS},
        "items": items,
        "next_before": next_before,
    }


def _run_checks(stored: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """A run's ``checks`` column as the API shows it (its instants as datetimes)."""
    if stored is None:
        return None
    return {
        name: {**check, "verified_up_to": moment_of(check.get("verified_up_to"))}
        for name, check in stored.items()
    }
