"""The ``kessai`` command: run the whole system, or one component, from the same settings.

Each command hands over to the component it names; ``kessai up`` (``kessai_cli.up``) starts
them all as supervised processes.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kessai.settings import Settings
from kessai_cli import campaigns, dead_letters, keys, loadgen_command, up
from kessai_cli.screen import console
from kessai_cli.supervisor import StopRequested, stop_on_signals, wait_for_exit
from reconciler.cli import reconcile

app = typer.Typer(
    help="kessai: a CQRS payment ledger. Settings come from KESSAI_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)


def migrate() -> None:
    """Bring the write store, the read database and the key store to the newest schema."""
    from migrations import upgrade

    settings = Settings()
    upgrade("write", settings.resolved_write_db_url())
    upgrade("read", settings.resolved_read_db_url())
    upgrade("keys", settings.resolved_keys_db_url())
    console.print("write store, read database and key store are at the newest schema")


def command_api(
    host: Annotated[str | None, typer.Option(help="Default: KESSAI_COMMAND_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_COMMAND_API_PORT.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the command API (payments and refunds)."""
    from kessai.runtime import serve_app

    settings = Settings()
    serve_app(
        "command_service.app:create_served_app",
        host or settings.command_api_host,
        port or settings.command_api_port,
        workers,
    )


def relay() -> None:
    """Publish the outbox to Kafka until stopped."""
    from command_service.relay import main as relay_main

    relay_main()


def projector() -> None:
    """Apply the payments topic to the read database until stopped."""
    from projector.service import main as projector_main

    projector_main()


def rewards() -> None:
    """Grant cashback and welcome bonuses from the payments topic until stopped."""
    from rewards.service import main as rewards_main

    rewards_main()


def query_api(
    host: Annotated[str | None, typer.Option(help="Default: KESSAI_QUERY_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_QUERY_API_PORT.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the query API (the merchant dashboard's reads, from the read database)."""
    from kessai.runtime import serve_app

    settings = Settings()
    serve_app(
        "query_service.app:create_served_app",
        host or settings.query_api_host,
        port or settings.query_api_port,
        workers,
    )


def broker(
    port: Annotated[int | None, typer.Option(help="Default: KESSAI_EMBEDDED_BROKER_PORT.")] = None,
) -> None:
    """Run the embedded Kafka-compatible broker (memory only) in the foreground."""
    from kessai.broker import EmbeddedBroker

    settings = Settings()
    embedded = EmbeddedBroker(port or settings.embedded_broker_port)
    with stop_on_signals():
        try:
            embedded.start()
            console.print(f"embedded broker listening on {embedded.bootstrap} (memory only)")
            wait_for_exit({})
        except StopRequested:
            pass
        finally:
            embedded.stop()


# In the order `kessai --help` lists them.
app.command()(migrate)
app.command("command-api")(command_api)
app.command()(relay)
app.command()(projector)
app.command()(rewards)
app.add_typer(dead_letters.dead_letters_app, name="dead-letters")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(campaigns.campaigns_app, name="campaigns")
app.command()(reconcile)
app.command()(broker)
app.command()(up.up)
app.command()(loadgen_command.loadgen)
app.command("query-api")(query_api)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
