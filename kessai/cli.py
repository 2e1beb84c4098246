"""The ``kessai`` command: run the whole system, or one component, from the same settings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from kessai.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from kessai.broker import EmbeddedBroker
    from kessai.supervisor import Child, Port
    from reconciler.service import RunResult

app = typer.Typer(
    help="kessai: a CQRS payment ledger. Settings come from KESSAI_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def migrate() -> None:
    """Bring the write store, the read database and the key store to the newest schema."""
    from kessai.migrate import upgrade

    settings = Settings()
    upgrade("write", settings.resolved_write_db_url())
    upgrade("read", settings.resolved_read_db_url())
    upgrade("keys", settings.resolved_keys_db_url())
    console.print("write store, read database and key store are at the newest schema")


def _serve(factory: str, host: str, port: int, workers: int) -> None:
    """Serve an app factory (``module:create_app``) with uvicorn; each worker builds its
    app from the same KESSAI_* settings."""
    import uvicorn

    from kessai.runtime import configure_logging

    configure_logging()
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level="warning",
    )


def run_command_api(host: str | None = None, port: int | None = None, workers: int = 1) -> None:
    settings = Settings()
    _serve(
        "command_service.app:create_served_app",
        host or settings.command_api_host,
        port or settings.command_api_port,
        workers,
    )


@app.command("command-api")
def command_api(
    host: Annotated[str | None, typer.Option(help="Default: KESSAI_COMMAND_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_COMMAND_API_PORT.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the command API (payments and refunds)."""
    run_command_api(host, port, workers)


@app.command()
def relay() -> None:
    """Publish the outbox to Kafka until stopped."""
    from command_service.relay import main as relay_main

    relay_main()


@app.command()
def projector() -> None:
    """Apply the payments topic to the read database until stopped."""
    from projector.service import main as projector_main

    projector_main()


dead_letters_app = typer.Typer(help="Records the projector could not apply.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")


@dead_letters_app.command("list")
def dead_letters_list(
    all_: Annotated[bool, typer.Option("--all", help="Resolved ones too.")] = False,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """List dead letters (open ones unless --all)."""
    from kessai.db import create_db_engine
    from projector.dead_letters import list_dead_letters

    engine = create_db_engine(Settings().resolved_read_db_url(), pool_size=1, write=False)
    try:
        letters = list_dead_letters(engine, status=None if all_ else "open", limit=limit)
    finally:
        engine.dispose()
    table = Table("id", "partition/offset", "status", "version", "reason")
    table.add_column("payment", no_wrap=True)
    for d in letters:
        table.add_row(
            str(d.dead_letter_id),
            f"{d.partition}/{d.offset}",
            d.status,
            str(d.version or "-"),
            d.reason,
            str(d.payment_id or "-"),
        )
    console.print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dead_letters_app.command("retry")
def dead_letters_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids.")] = None,
    all_open: Annotated[bool, typer.Option("--all", help="Every open dead letter.")] = False,
) -> None:
    """Apply dead letters again through the projector's path; exit 1 if any still fails."""
    from kessai.db import create_db_engine
    from projector.dead_letters import list_dead_letters, retry_dead_letter

    settings = Settings()
    engine = create_db_engine(settings.resolved_read_db_url(), pool_size=1)
    failed = 0
    try:
        targets = list(ids or [])
        if all_open:
            targets += [d.dead_letter_id for d in list_dead_letters(engine, limit=100_000)]
        if not targets:
            console.print("nothing to retry: give ids or --all")
            raise typer.Exit(2)
        for dead_letter_id in targets:
            try:
                outcome = retry_dead_letter(
                    engine, dead_letter_id, default_zone=settings.default_merchant_time_zone
                )
            except LookupError as exc:
                console.print(f"[red]{exc}[/red]")
                failed += 1
                continue
            mark = "[green]resolved[/green]" if outcome.resolved else "[red]still failing[/red]"
            console.print(f"{dead_letter_id}: {mark}: {outcome.reason}")
            failed += 0 if outcome.resolved else 1
    finally:
        engine.dispose()
    if failed:
        raise typer.Exit(1)


keys_app = typer.Typer(
    help="API keys of both services (stored as hashes in the key store).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _keys_engine(settings: Settings) -> Engine:
    from kessai.db import create_db_engine
    from kessai.migrate import upgrade

    url = settings.resolved_keys_db_url()
    upgrade("keys", url)
    return create_db_engine(url, pool_size=1)


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="payments:write, merchant:<merchant_id>:read, users:read or admin; repeat "
            "for several.",
        ),
    ],
    name: Annotated[str, typer.Option(help="What the key is for (at most 100 characters).")] = "",
) -> None:
    """Create a key. It is shown once, alone on the last line of output; only its hash is
    kept."""
    from kessai.auth import create_key

    engine = _keys_engine(Settings())
    try:
        record, key = create_key(engine, scope, name)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    console.print(
        f"created key {record.key_id} ({', '.join(record.scopes)}); store it now, it is not "
        "shown again:"
    )
    print(key)  # plain, alone on its line: scripts take the last line


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, name, scopes, when created and revoked (never the secret)."""
    from kessai.auth import list_keys

    engine = _keys_engine(Settings())
    try:
        records = list_keys(engine)
    finally:
        engine.dispose()
    table = Table(title=f"{len(records)} key(s)")
    for column in ("key id", "name", "scopes", "created", "revoked"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.key_id,
            r.name,
            " ".join(r.scopes),
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
            f"{r.revoked_at:%Y-%m-%d %H:%M:%S}" if r.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (or the whole key).")],
) -> None:
    """Revoke a key. Services stop accepting it within KESSAI_AUTH_CACHE_SECONDS."""
    from kessai.auth import revoke_key

    settings = Settings()
    engine = _keys_engine(settings)
    try:
        revoked = revoke_key(engine, key_id)
    finally:
        engine.dispose()
    if not revoked:
        console.print("[red]no such active key[/red]")
        raise typer.Exit(1)
    console.print(
        f"revoked; refused everywhere within {settings.auth_cache_seconds:g} s "
        "(KESSAI_AUTH_CACHE_SECONDS)"
    )


DEV_MERCHANTS = ("shop-1", "shop-2")
"""The merchants of the README's examples: the development merchant key reads these."""
DEV_KEYS = {
    "payments": ("development payments backend", ["payments:write"]),
    "merchant": (
        "development merchant dashboard",
        [f"merchant:{m}:read" for m in DEV_MERCHANTS],
    ),
    "users": ("development app backend", ["users:read"]),
    "admin": ("development operator", ["admin"]),
}


def dev_keys(settings: Settings) -> tuple[dict[str, str], Path]:
    """One key per scope for development, kept in ``$KESSAI_HOME/dev-keys.json``: reused while
    they still work, created again when not."""
    import json

    from kessai.auth import create_key, lookup, verify

    path = settings.home.resolve() / "dev-keys.json"
    engine = _keys_engine(settings)
    try:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(path.read_text())
            if isinstance(known, dict) and set(known) == set(DEV_KEYS):
                usable = True
                for key in known.values():
                    parts = str(key).split("_", 2)
                    record = lookup(engine, parts[1]) if len(parts) == 3 else None
                    usable = usable and len(parts) == 3 and verify(record, parts[2])
                if usable:
                    return {k: str(v) for k, v in known.items()}, path
        keys = {
            label: create_key(engine, scopes, name)[1] for label, (name, scopes) in DEV_KEYS.items()
        }
    finally:
        engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(keys, indent=2) + "\n")
    return keys, path


@app.command()
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
    from reconciler.compare import time_of
    from reconciler.records import last_completed, recent_runs

    engine = create_db_engine(settings.resolved_read_db_url(), pool_size=1, write=False)
    try:
        runs = recent_runs(engine, limit)
        last_full = last_completed(engine, mode="full")
    except sa.exc.SQLAlchemyError as exc:
        console.print(f"[red]cannot read the run history: {exc}[/red]")
        return 2
    finally:
        engine.dispose()
    table = Table(
        "run", "started (UTC)", "seconds", "mode", "verified", "dry run", "checked", "findings",
        "repaired", "outcome", "watermark to (UTC)", "error", title="reconciliation runs",
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
            time_of(r.watermark_to),
            (r.error or "")[:80],
        )
    console.print(table)
    when = last_full.strftime("%Y-%m-%d %H:%M:%S UTC") if last_full else "never"
    console.print(f"last completed full audit: {when}")
    return 0


def _reconcile(
    settings: Settings,
    *,
    full: bool,
    dry_run: bool,
    interval: float | None,
    full_audit_every: float,
) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from kessai.db import create_db_engine
    from kessai.runtime import stop_on_signals
    from reconciler.service import Reconciler, ReconcilerMetrics

    write_engine = create_db_engine(settings.resolved_write_db_url(), pool_size=2, write=False)
    read_engine = create_db_engine(settings.resolved_read_db_url(), pool_size=2)
    metrics: ReconcilerMetrics | None = None
    if interval is not None and settings.reconciler_metrics_port is not None:
        registry = CollectorRegistry()
        metrics = ReconcilerMetrics(registry)
        start_http_server(settings.reconciler_metrics_port, addr="127.0.0.1", registry=registry)
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

    from reconciler.compare import time_of

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


@app.command()
def broker(
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_EMBEDDED_BROKER_PORT.")] = None,
) -> None:
    """Run the embedded Kafka-compatible broker (memory only) in the foreground."""
    from kessai.broker import EmbeddedBroker

    settings = Settings()
    embedded = EmbeddedBroker(port or settings.embedded_broker_port)
    with _stop_on_signals():
        try:
            embedded.start()
            console.print(f"embedded broker listening on {embedded.bootstrap} (memory only)")
            _wait_for_exit({})
        except _StopRequested:
            pass
        finally:
            embedded.stop()


@app.command()
def up() -> None:
    """Start every service on this machine (embedded defaults) until Ctrl-C or SIGTERM.

    Migrates first. Without KESSAI_KAFKA_BOOTSTRAP the embedded broker is started too. A
    component that dies is restarted with backoff, the embedded broker included; each death
    and restart is printed. The children die with ``kessai up``, even when it is killed.
    """
    from kessai.broker import BrokerUnavailable
    from kessai.supervisor import StartFailed, port_problems, supervise

    settings = Settings()
    # Every port is checked before anything starts: a taken one is a sentence, not a traceback
    # from deep inside a child after half the system came up.
    problems = port_problems(_ports(settings))
    for problem in problems:
        _say(problem, style="red")
    if problems:
        raise typer.Exit(1)
    system = _System(settings)
    failed: str | None = None
    with _stop_on_signals():
        try:
            system.start()
            for warning in _warnings(settings):
                _say(f"warning: {warning}", style="yellow")
            console.print("Ctrl-C stops everything.")
            supervise(system.children, say=lambda event: _say(event, style="yellow", at=True))
        except _StopRequested:
            pass
        except (StartFailed, BrokerUnavailable) as exc:
            failed = str(exc)
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            system.stop()
            console.print("stopped")
    if failed:
        _say(f"kessai could not start: {failed}", style="red")
        raise typer.Exit(1)


def _say(message: str, *, style: str, at: bool = False) -> None:
    """One event on the screen, unwrapped and without markup (paths and settings print as
    they are)."""
    if at:
        message = f"{time.strftime('%H:%M:%S')} {message}"
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def _ports(settings: Settings) -> list[Port]:
    from kessai.supervisor import Port

    ports = [
        Port(
            settings.command_api_host,
            settings.command_api_port,
            "command API",
            "KESSAI_COMMAND_API_PORT",
        ),
        Port(
            settings.query_api_host,
            settings.query_api_port,
            "query API",
            "KESSAI_QUERY_API_PORT",
        ),
    ]
    if settings.uses_embedded_broker:
        ports.append(
            Port(
                "127.0.0.1",
                settings.embedded_broker_port,
                "embedded broker",
                "KESSAI_EMBEDDED_BROKER_PORT",
            )
        )
    metrics = [
        (settings.projector_metrics_port, "projector metrics", "KESSAI_PROJECTOR_METRICS_PORT"),
        (settings.relay_metrics_port, "relay metrics", "KESSAI_RELAY_METRICS_PORT"),
        (
            settings.reconciler_metrics_port,
            "reconciler metrics",
            "KESSAI_RECONCILER_METRICS_PORT",
        ),
    ]
    ports.extend(Port("127.0.0.1", port, name, env) for port, name, env in metrics if port)
    return ports


def _reconciler_schedule(settings: Settings) -> str:
    audit = settings.reconcile_full_audit_every
    full = (
        "no scheduled full audit"
        if not settings.full_audit_every_seconds()
        else (f"a full audit every {audit}")
    )
    return f"every {RECONCILE_EVERY}, {full} (kessai reconcile --history)"


def _warnings(settings: Settings) -> list[str]:
    """What a user of ``kessai up`` must see on the screen, not only in a component's log."""
    warnings: list[str] = []
    if settings.acquirer_url is None:
        warnings.append(
            "KESSAI_ACQUIRER_URL is unset: card payments are refused (503 "
            "acquirer_unavailable); balance payments work (README, Card payments)"
        )
    return warnings


RECONCILE_EVERY = "5m"

KAFKA_CLIENTS = ("relay", "projector", "reconciler")
"""The children that talk to the broker (frozen while the embedded broker restarts)."""


class _System:
    """The processes of ``kessai up``: the embedded broker and one child per component."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.env = {**os.environ, "KESSAI_HOME": str(self.home)}
        self.embedded: EmbeddedBroker | None = None
        self.children: list[Child] = []

    def start(self) -> None:
        from kessai.broker import EmbeddedBroker, ensure_topic
        from kessai.migrate import upgrade
        from kessai.supervisor import Child

        settings, home = self.settings, self.home
        home.mkdir(parents=True, exist_ok=True)
        rows: list[tuple[str, str]] = []
        if settings.uses_embedded_broker:
            self.embedded = EmbeddedBroker(
                settings.embedded_broker_port, log_path=home / "broker.log"
            )
            broker = Child("broker", self._start_broker, home / "broker.log")
            self.children.append(broker)
            broker.start()
            self.env["KESSAI_KAFKA_BOOTSTRAP"] = self.embedded.bootstrap
            rows.append(("broker (embedded, memory only)", self.embedded.bootstrap))
        else:
            asyncio.run(
                ensure_topic(
                    settings.resolved_kafka_bootstrap(),
                    settings.topic,
                    partitions=settings.topic_partitions,
                    replication_factor=settings.topic_replication_factor,
                )
            )
        bootstrap = self.env.get("KESSAI_KAFKA_BOOTSTRAP") or settings.resolved_kafka_bootstrap()
        upgrade("write", settings.resolved_write_db_url())
        upgrade("read", settings.resolved_read_db_url())
        upgrade("keys", settings.resolved_keys_db_url())
        rows.append(("write store", _redact(settings.resolved_write_db_url())))
        rows.append(("read database", _redact(settings.resolved_read_db_url())))
        rows.append(("key store", _redact(settings.resolved_keys_db_url())))
        keys: dict[str, str] = {}
        keys_path: Path | None = None
        if settings.environment == "development":
            keys, keys_path = dev_keys(settings)

        command_url = f"http://{settings.command_api_host}:{settings.command_api_port}"
        query_url = f"http://{settings.query_api_host}:{settings.query_api_port}"
        by_name: dict[str, Child] = {}
        for name, module in (
            ("command-api", ["command_service"]),
            ("relay", ["command_service.relay"]),
            ("projector", ["projector"]),
            ("query-api", ["query_service"]),
            ("reconciler", ["reconciler", "--every", RECONCILE_EVERY]),
        ):
            log_path = home / f"{name}.log"
            child = Child(name, functools.partial(_spawn, module, self.env, log_path), log_path)
            self.children.append(child)
            by_name[name] = child
            child.start()
        _wait_http(f"{command_url}/healthz", by_name["command-api"])
        _wait_http(f"{query_url}/healthz", by_name["query-api"])
        rows += [
            ("command API", f"{command_url}  (docs: {command_url}/docs)"),
            ("relay", f"outbox -> {bootstrap} topic {settings.topic}"),
            ("projector", f"{settings.topic} -> read database"),
            ("query API", f"{query_url}  (docs: {query_url}/docs)"),
            ("reconciler", _reconciler_schedule(settings)),
            ("logs", str(home)),
        ]
        table = Table(title="kessai is up", show_header=False)
        for name, where in rows:
            table.add_row(name, where)
        console.print(table)
        if keys_path is not None:
            dev = Table(title=f"development API keys (also in {keys_path})", show_header=False)
            for label, key in keys.items():
                dev.add_row(", ".join(DEV_KEYS[label][1]), key)
            console.print(dev)

    def _start_broker(self) -> subprocess.Popen[bytes]:
        """Start the embedded broker, again after a crash, and create the topic before any
        client can touch it: a restarted broker is empty, and the first client to ask for the
        topic would have it auto-created with 4 partitions, for good. So the Kafka clients are
        frozen (SIGSTOP) from just before the broker listens until the topic exists, a fraction
        of a second; the APIs are not."""
        from kessai.broker import BrokerUnavailable, ensure_topic
        from kessai.supervisor import StartFailed, paused

        assert self.embedded is not None
        settings = self.settings
        clients = (c.process for c in self.children if c.name in KAFKA_CLIENTS)
        with paused(clients):
            try:
                self.embedded.start()
                asyncio.run(
                    ensure_topic(
                        self.embedded.bootstrap,
                        settings.topic,
                        partitions=settings.topic_partitions,
                        replication_factor=settings.topic_replication_factor,
                    )
                )
            except BrokerUnavailable as exc:
                self.embedded.kill()
                raise StartFailed(f"embedded broker: {exc}") from exc
        assert self.embedded.process is not None
        return self.embedded.process

    def stop(self) -> None:
        from kessai.supervisor import signal_group

        # Every child is asked at once, so a stop takes as long as the slowest child, not the
        # sum of them (each stops cleanly on its own: the outbox keeps what is unpublished).
        # The broker goes last: the relay may still be publishing.
        components = [
            (c.name, c.process) for c in self.children if c.name != "broker" and c.process
        ]
        for _name, process in reversed(components):
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for name, process in reversed(components):
            _wait_or_kill(name, process, deadline)
        if self.embedded is not None:
            self.embedded.stop()


def _spawn(module: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    from kessai.supervisor import start_process

    return start_process([sys.executable, "-m", *module], env=env, log_path=log_path)


STOP_SECONDS = 15.0
"""How long `kessai up` lets its children stop cleanly after SIGTERM before killing them."""


def _wait_or_kill(name: str, child: subprocess.Popen[bytes], deadline: float) -> None:
    from kessai.supervisor import signal_group

    try:
        child.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        console.print(f"{name} did not stop in {STOP_SECONDS:.0f} s; killing it")
        signal_group(child, signal.SIGKILL)
        child.wait()


def _wait_http(url: str, child: Child, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            exited = child.process is None or child.process.poll() is not None
            if exited or time.monotonic() > deadline:
                console.print(f"[red]{url} did not come up; see the logs in KESSAI_HOME[/red]")
                raise typer.Exit(1) from None
            time.sleep(0.1)


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop everything cleanly."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``_StopRequested`` wherever the main thread is, so a stop
    during start-up cleans up what was already started."""

    def on_signal(_signum: int, _frame: object) -> None:
        raise _StopRequested

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_for_exit(children: dict[str, subprocess.Popen[bytes]]) -> str:
    """Block until a child exits (returns its name); a signal interrupts with _StopRequested."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                return name
        time.sleep(0.2)


def _redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


@app.command()
def loadgen(
    url: Annotated[
        str | None,
        typer.Option(help="Command API base URL. Default: KESSAI_COMMAND_API_HOST and _PORT."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="A payments:write key. Default: `payments` in $KESSAI_HOME/dev-keys.json.",
        ),
    ] = None,
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 64,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many requests.")
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(min=0.1, help="Stop after this many seconds (default 10 without --requests)."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Open loop: this many requests/s (default: as fast as possible)."
        ),
    ] = None,
    merchants: Annotated[
        int,
        typer.Option(min=1, help="Merchants shop-1 ... shop-N (Zipf; shop-1 takes --hot-share)."),
    ] = 1_000,
    hot_share: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.30,
    refund_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests that are refunds.")
    ] = 0.03,
    retry_share: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of client retries (same key, same body)."),
    ] = 0.01,
    users: Annotated[int, typer.Option(min=1, help="Users (one device id each).")] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the summary here as JSON.")
    ] = None,
) -> None:
    """Drive campaign traffic (payments, refunds, client retries) against a running command
    API and print what it answered: counts by status, accepted/s, latency percentiles."""
    import json

    from kessai import loadgen as lg

    settings = Settings()
    if url is None:
        url = f"http://{settings.command_api_host}:{settings.command_api_port}"
    if api_key is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            api_key = str(json.loads((settings.home / "dev-keys.json").read_text())["payments"])
    if not api_key:
        console.print(
            "[red]no API key: give --api-key (payments:write), or run `kessai up` first "
            "(it writes $KESSAI_HOME/dev-keys.json)[/red]"
        )
        raise typer.Exit(2)
    if requests is None and duration is None:
        duration = 10.0
    plan = lg.Run(
        url=url,
        api_key=api_key,
        connections=connections,
        requests=requests,
        duration=duration,
        rate=rate,
    )
    mix = lg.Mix(
        merchants=merchants,
        hot_share=hot_share,
        refund_share=refund_share,
        retry_share=retry_share,
        users=users,
        seed=seed,
    )
    limit = f"{requests:,} requests" if requests else ""
    if duration:
        limit += (" or " if limit else "") + f"{duration:g} s"
    console.print(
        f"{url}: {connections} connections, {limit}"
        + (f", {rate:g} requests/s" if rate else ", closed loop")
    )
    from rich.live import Live

    with Live(console=console, refresh_per_second=4, transient=True) as live:

        def on_progress(result: lg.Result, elapsed: float) -> None:
            statuses = " ".join(f"{k}:{v}" for k, v in sorted(result.by_status.items()))
            live.update(
                f"{elapsed:6.1f} s  sent {result.sent:,}  accepted {result.accepted:,} "
                f"({result.accepted / elapsed if elapsed else 0:,.0f}/s)  "
                f"errors {result.connection_errors}  {statuses}"
            )

        try:
            result = lg.run_sync(plan, mix, on_progress)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    summary = result.summary()
    table = Table(title="loadgen", show_header=False)
    table.add_row("sent", f"{result.sent:,} in {result.elapsed:.1f} s")
    table.add_row(
        "by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(result.by_status.items())) or "-"
    )
    for kind, statuses in sorted(result.by_kind.items()):
        table.add_row(f"  {kind}", ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    table.add_row("connection errors", f"{result.connection_errors:,}")
    table.add_row(
        "accepted",
        f"{result.accepted:,} ({result.payments:,} payments, {result.refunds:,} refunds), "
        f"{result.accepted_per_second:,.0f}/s",
    )
    table.add_row("replayed", f"{result.replayed:,}")
    ms = summary["latency_ms"]
    table.add_row(
        "latency ms", f"p50 {ms['p50']}  p90 {ms['p90']}  p99 {ms['p99']}  max {ms['max']}"
    )
    if result.per_merchant and result.payments:
        top, count = result.per_merchant.most_common(1)[0]
        table.add_row("busiest merchant", f"{top}: {count / result.payments:.0%} of payments")
    table.add_row("client CPU", f"{result.client_cpu_seconds:.1f} s")
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if result.connection_errors or not result.latencies:
        raise typer.Exit(1)


def run_query_api(host: str | None = None, port: int | None = None, workers: int = 1) -> None:
    settings = Settings()
    _serve(
        "query_service.app:create_served_app",
        host or settings.query_api_host,
        port or settings.query_api_port,
        workers,
    )


@app.command("query-api")
def query_api(
    host: Annotated[str | None, typer.Option(help="Default: KESSAI_QUERY_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_QUERY_API_PORT.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the query API (the merchant dashboard's reads, from the read database)."""
    run_query_api(host, port, workers)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
