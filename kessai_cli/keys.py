"""``kessai keys``: API keys of both services, and the development keys of ``kessai up``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from kessai.settings import Settings
from kessai_cli.screen import console

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

keys_app = typer.Typer(
    help="API keys of both services (stored as hashes in the key store).", no_args_is_help=True
)


def keys_engine(settings: Settings) -> Engine:
    from kessai.db import create_db_engine
    from migrations import upgrade

    url = settings.resolved_keys_db_url()
    upgrade("keys", url)
    return create_db_engine(url, pool_size=1)


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="payments:write, wallets:write, users:write, merchant:<merchant_id>:read, "
            "users:read or admin; repeat for several.",
        ),
    ],
    name: Annotated[str, typer.Option(help="What the key is for (at most 100 characters).")] = "",
) -> None:
    """Create a key. It is shown once, alone on the last line of output; only its hash is
    kept."""
    from kessai.auth import create_key

    engine = keys_engine(Settings())
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

    engine = keys_engine(Settings())
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
    engine = keys_engine(settings)
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
    "wallets": ("development top-up backend", ["wallets:write"]),
    "signups": ("development sign-up backend", ["users:write"]),
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
    engine = keys_engine(settings)
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
