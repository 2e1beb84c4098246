"""``python -m reconciler``: one reconciliation run (same as ``kessai reconcile``)."""

import typer

from reconciler.cli import reconcile


def main() -> None:
    typer.run(reconcile)


if __name__ == "__main__":
    main()
