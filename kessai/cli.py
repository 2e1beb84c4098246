"""The ``kessai`` command: run the whole system, or one component, from the same settings."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kessai.settings import Settings

app = typer.Typer(
    help="kessai: a CQRS payment ledger. Settings come from KESSAI_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def migrate() -> None:
    """Bring the write store and the read database to the newest schema."""
    from kessai.migrate import upgrade

    settings = Settings()
    upgrade("write", settings.resolved_write_db_url())
    upgrade("read", settings.resolved_read_db_url())
    console.print("write store and read database are at the newest schema")


def run_command_api(host: str | None = None, port: int | None = None, workers: int = 1) -> None:
    import uvicorn

    from kessai.runtime import configure_logging

    configure_logging()
    settings = Settings()
    uvicorn.run(
        "command_service.app:create_app",
        factory=True,
        host=host or settings.command_api_host,
        port=port or settings.command_api_port,
        workers=workers,
        access_log=False,
        log_level="warning",
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
def broker(
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_EMBEDDED_BROKER_PORT.")] = None,
) -> None:
    """Run the embedded Kafka-compatible broker (memory only) in the foreground."""
    from kessai.broker import EmbeddedBroker

    settings = Settings()
    embedded = EmbeddedBroker(port or settings.embedded_broker_port)
    embedded.start()
    console.print(f"embedded broker listening on {embedded.bootstrap} (memory only)")
    _wait_for_signal()
    embedded.stop()


@app.command()
def up() -> None:
    """Start every service on this machine (embedded defaults) until Ctrl-C or SIGTERM.

    Migrates first. Without KESSAI_KAFKA_BOOTSTRAP the embedded broker is started too.
    """
    from kessai.broker import EmbeddedBroker, ensure_topic
    from kessai.migrate import upgrade

    settings = Settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KESSAI_HOME": str(home)}
    embedded: EmbeddedBroker | None = None
    children: dict[str, subprocess.Popen[bytes]] = {}
    rows: list[tuple[str, str]] = []
    try:
        if settings.uses_embedded_broker:
            embedded = EmbeddedBroker(settings.embedded_broker_port, log_path=home / "broker.log")
            embedded.start()
            env["KESSAI_KAFKA_BOOTSTRAP"] = embedded.bootstrap
            rows.append(("broker (embedded, memory only)", embedded.bootstrap))
        bootstrap = env.get("KESSAI_KAFKA_BOOTSTRAP") or settings.resolved_kafka_bootstrap()
        asyncio.run(
            ensure_topic(
                bootstrap,
                settings.topic,
                partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
            )
        )
        upgrade("write", settings.resolved_write_db_url())
        upgrade("read", settings.resolved_read_db_url())
        rows.append(("write store", _redact(settings.resolved_write_db_url())))
        rows.append(("read database", _redact(settings.resolved_read_db_url())))

        api_url = f"http://{settings.command_api_host}:{settings.command_api_port}"
        children["command-api"] = _spawn(["command_service"], env, home / "command-api.log")
        children["relay"] = _spawn(["command_service.relay"], env, home / "relay.log")
        _wait_http(f"{api_url}/healthz", children["command-api"])
        rows.append(("command API", f"{api_url}  (docs: {api_url}/docs)"))
        rows.append(("relay", f"outbox -> {bootstrap} topic {settings.topic}"))
        rows.append(("logs", str(home)))

        table = Table(title="kessai is up", show_header=False)
        for name, where in rows:
            table.add_row(name, where)
        console.print(table)
        console.print("Ctrl-C stops everything.")
        exited = _wait_for_signal(children)
        if exited:
            console.print(f"[red]{exited} exited unexpectedly; stopping everything[/red]")
            raise typer.Exit(1)
    finally:
        for name, child in reversed(children.items()):
            _stop(name, child)
        if embedded is not None:
            embedded.stop()
        console.print("stopped")


def _spawn(module: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", *module],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _stop(name: str, child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            console.print(f"{name} did not stop in 15 s; killing it")
            child.kill()
            child.wait()


def _wait_http(url: str, child: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                console.print(f"[red]{url} did not come up; see the logs in KESSAI_HOME[/red]")
                raise typer.Exit(1) from None
            time.sleep(0.1)


def _wait_for_signal(children: dict[str, subprocess.Popen[bytes]] | None = None) -> str | None:
    """Block until SIGINT/SIGTERM (returns None) or a child exits (returns its name)."""
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            for name, child in (children or {}).items():
                if child.poll() is not None:
                    return name
            time.sleep(0.2)
        return None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
