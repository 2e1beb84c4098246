"""The terminal the ``kessai`` command prints to."""

from __future__ import annotations

import time

from rich.console import Console

console = Console()


def say(message: str, *, style: str, at: bool = False) -> None:
    """One event on the screen, unwrapped and without markup (paths and settings print as
    they are)."""
    if at:
        message = f"{time.strftime('%H:%M:%S')} {message}"
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)
