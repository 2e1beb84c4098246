"""``kessai up``: the whole system on this machine, supervised, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from kessai.settings import Settings
from kessai_cli.keys import DEV_KEYS, dev_keys
from kessai_cli.screen import console, say
from kessai_cli.supervisor import StopRequested, stop_on_signals

if TYPE_CHECKING:
    from kessai.broker import EmbeddedBroker
    from kessai_cli.supervisor import Child, Port


def up() -> None:
    """Start every service on this machine (embedded defaults) until Ctrl-C or SIGTERM.

    Migrates first. Without KESSAI_KAFKA_BOOTSTRAP the embedded broker is started too. A
    component that dies is restarted with backoff, the embedded broker included; each death
    and restart is printed. The children die with ``kessai up``, even when it is killed.
    """
    from kessai.broker import BrokerUnavailable
    from kessai_cli.supervisor import StartFailed, port_problems, supervise

    settings = Settings()
    # Every port is checked before anything starts: a taken one is a sentence, not a traceback
    # from deep inside a child after half the system came up.
    problems = port_problems(_ports(settings))
    for problem in problems:
        say(problem, style="red")
    if problems:
        raise typer.Exit(1)
    system = _System(settings)
    failed: str | None = None
    with stop_on_signals():
        try:
            system.start()
            for warning in _warnings(settings):
                say(f"warning: {warning}", style="yellow")
            console.print("Ctrl-C stops everything.")
            supervise(system.children, say=lambda event: say(event, style="yellow", at=True))
        except StopRequested:
            pass
        except (StartFailed, BrokerUnavailable) as exc:
            failed = str(exc)
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            system.stop()
            console.print("stopped")
    if failed:
        say(f"kessai could not start: {failed}", style="red")
        raise typer.Exit(1)


def _ports(settings: Settings) -> list[Port]:
    from kessai_cli.supervisor import Port

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
        (settings.rewards_metrics_port, "rewards metrics", "KESSAI_REWARDS_METRICS_PORT"),
        (
            settings.reconciler_metrics_port,
            "reconciler metrics",
            "KESSAI_RECONCILER_METRICS_PORT",
        ),
    ]
    ports.extend(
        Port(settings.metrics_host, port, name, env) for port, name, env in metrics if port
    )
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

KAFKA_CLIENTS = ("relay", "projector", "rewards", "reconciler")
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
        from kessai_cli.supervisor import Child
        from migrations import upgrade

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
            ("rewards", ["rewards"]),
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
            ("rewards", f"{settings.topic} -> grants in the write store"),
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
        from kessai_cli.supervisor import StartFailed, paused

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
        from kessai.processes import signal_group

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
    from kessai.processes import start_process

    return start_process([sys.executable, "-m", *module], env=env, log_path=log_path)


STOP_SECONDS = 15.0
"""How long `kessai up` lets its children stop cleanly after SIGTERM before killing them."""


def _wait_or_kill(name: str, child: subprocess.Popen[bytes], deadline: float) -> None:
    from kessai.processes import signal_group

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


def _redact(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)
