"""``kessai dead-letters``: the records the projector could not apply, listed and retried."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kessai.settings import Settings
from kessai_cli.screen import console

dead_letters_app = typer.Typer(help="Records the projector could not apply.", no_args_is_help=True)


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
