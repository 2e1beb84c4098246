"""``kessai reconcile`` and ``python -m reconciler``: one run, a schedule, or the run history,
printed for a person (exit codes for a scheduler)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from kessai.settings import Settings

if TYPE_CHECKING:
    from reconciler.service import RunResult

console = Console()


def reconcile(
    full: Annotated[
        bool, typer.Option("--full", help="Check every payment, not only what changed.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report only: re-publish and rewrite nothing.")
    ] = False,
    every: Annotated[
        str | None,
        typer.Option(help="Repeat on this interval (30s, 5m, 1h) until SIGINT/SIGTERM."),
    ] = None,
    full_every: Annotated[
        str | None,
        typer.Option(
            help="With --every: also a full audit this often (24h; 0: never). "
            "Default: KESSAI_RECONCILE_FULL_AUDIT_EVERY."
        ),
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Show recent runs instead of running.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="Runs shown by --history.")] = 20,
) -> None:
    """Compare the write store with the read database and repair the read side.

    Exit code 0: consistent within the run's scope (after repair); 1: drift remains, or a
    repair touched totals outside the scope; 2: could not run, stopped, or another run holds
    the lock.
    """
    from kessai.clock import parse_interval

    settings = Settings()
    interval: float | None = None
    try:
        if every is not None:
            interval = parse_interval(every)
        audit_every = parse_interval(
            full_every or settings.reconcile_full_audit_every, zero_allowed=True
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if history:
        raise typer.Exit(_reconcile_history(settings, limit))
    raise typer.Exit(
        _reconcile(
            settings, full=full, dry_run=dry_run, interval=interval, full_audit_every=audit_every
        )
    )


def _reconcile_history(settings: Settings, limit: int) -> int:
    import sqlalchemy as sa

    from kessai.db import create_db_engine
    from kessai.ids import time_of
    from reconciler.records import last_completed, recent_runs, verified_up_to

    engine = create_db_engine(settings.resolved_read_db_url(), pool_size=1, write=False)
    try:
        runs = recent_runs(engine, limit)
        last_full = last_completed(engine, mode="full")
        verified = verified_up_to(engine)
    except sa.exc.SQLAlchemyError as exc:
        console.print(f"[red]cannot read the run history: {exc}[/red]")
        return 2
    finally:
        engine.dispose()
    table = Table(
        "run", "started (UTC)", "seconds", "mode", "verified", "dry run", "checked", "findings",
        "repaired", "outcome", "drift in", "watermark to (UTC)", "error",
        title="reconciliation runs",
    )  # fmt: skip
    for r in runs:
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else "-"
        table.add_row(
            str(r.run_id),
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            seconds,
            r.mode,
            r.scope or "-",
            "yes" if r.dry_run else "no",
            str(r.payments_checked),
            str(r.findings_count),
            str(r.repaired_count),
            r.outcome or "running",
            "-" if r.checks is None else ", ".join(n for n, c in r.checks.items() if c.unrepaired),
            time_of(r.watermark_to),
            (r.error or "")[:80],
        )
    console.print(table)
    when = last_full.strftime("%Y-%m-%d %H:%M:%S UTC") if last_full else "never"
    console.print(f"last completed full audit: {when}")
    console.print(_checks_table(verified))
    return 0


def _checks_table(
    verified: Mapping[str, datetime | None], counts: Mapping[str, tuple[int, int]] | None = None
) -> Table:
    """Per check, the instant it is verified up to (everything it covers, from the beginning of
    the ledger; "never" before its first full audit), and with ``counts`` a run's findings of
    it and those left unrepaired."""
    counted = ("findings", "unrepaired") if counts is not None else ()
    table = Table("check", *counted, "verified up to (UTC)", title="checks")
    for name, moment in verified.items():
        when = moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment else "never"
        table.add_row(name, *(str(n) for n in (counts or {}).get(name, ())), when)
    return table


def _reconcile(
    settings: Settings,
    *,
    full: bool,
    dry_run: bool,
    interval: float | None,
    full_audit_every: float,
) -> int:
    from prometheus_client import CollectorRegistry

    from kessai.db import create_db_engine
    from kessai.observability import serve_metrics
    from kessai.runtime import stop_on_signals
    from reconciler.service import Reconciler, ReconcilerMetrics

    write_engine = create_db_engine(settings.resolved_write_db_url(), pool_size=2, write=False)
    read_engine = create_db_engine(settings.resolved_read_db_url(), pool_size=2)
    metrics: ReconcilerMetrics | None = None
    if interval is not None and settings.reconciler_metrics_port is not None:
        registry = CollectorRegistry()
        metrics = ReconcilerMetrics(registry)
        serve_metrics(settings, settings.reconciler_metrics_port, registry)
    reconciler = Reconciler(
        write_engine=write_engine, read_engine=read_engine, settings=settings, metrics=metrics
    )

    async def once() -> RunResult:
        # SIGINT/SIGTERM end the run at its next phase, which releases the lock at once.
        stop = stop_on_signals()
        if not console.is_terminal:
            return await reconciler.run(full=full, dry_run=dry_run, stop=stop)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("payments checked", total=None)

            def on_progress(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            return await reconciler.run(full=full, dry_run=dry_run, progress=on_progress, stop=stop)

    async def scheduled(seconds: float) -> int:
        stop = stop_on_signals()
        if metrics is not None:
            import sqlalchemy as sa

            with contextlib.suppress(sa.exc.SQLAlchemyError):
                await asyncio.to_thread(reconciler.load_last_successes)
        audits = f"; a full audit every {full_audit_every:g} s" if full_audit_every else ""
        console.print(f"reconciling every {seconds:g} s{audits}; Ctrl-C stops")
        return await reconciler.run_every(
            seconds,
            stop,
            full=full,
            dry_run=dry_run,
            full_audit_every=full_audit_every,
            on_result=_print_reconcile_result,
        )

    try:
        if interval is not None:
            return asyncio.run(scheduled(interval))
        result = asyncio.run(once())
        _print_reconcile_result(result)
        return result.exit_code
    finally:
        write_engine.dispose()
        read_engine.dispose()


def _print_reconcile_result(result: RunResult) -> None:
    import orjson

    from kessai.ids import time_of

    if result.findings:
        findings = Table("kind", "payment / merchant", "repaired", "details", title="findings")
        for f in result.findings[:50]:
            findings.add_row(
                f.kind,
                str(f.payment_id or f.merchant_id or "-"),
                "yes" if f.repaired else "no",
                orjson.dumps(f.details or {}, default=str).decode()[:120],
            )
        console.print(findings)
        if len(result.findings) > 50:
            console.print(f"... and {len(result.findings) - 50} more (see the run's findings)")
    colour = {"consistent": "green", "drift": "yellow"}.get(result.outcome, "red")
    summary = Table(title="reconciliation", show_header=False)
    summary.add_row("run", str(result.run_id or "-"))
    summary.add_row("mode", result.mode + (" (dry run)" if result.dry_run else ""))
    summary.add_row("verified", result.scope)
    summary.add_row("payments checked", str(result.payments_checked))
    summary.add_row("findings", str(len(result.findings)))
    summary.add_row("repaired", str(result.repaired_count))
    summary.add_row(
        "watermark (UTC)", f"{time_of(result.watermark_from)} -> {time_of(result.watermark_to)}"
    )
    outcome = result.outcome
    if outcome == "consistent":
        outcome = (
            "consistent: everything"
            if result.scope == "everything"
            else f"consistent within scope ({result.scope}); older events not checked"
        )
    summary.add_row("outcome", f"[{colour}]{outcome}[/{colour}]")
    if result.error:
        summary.add_row("error", result.error)
    console.print(summary)
    if result.checks is not None:
        verified = {name: c.verified_up_to for name, c in result.checks.items()}
        counts = {name: (c.findings, c.unrepaired) for name, c in result.checks.items()}
        console.print(_checks_table(verified, counts))
