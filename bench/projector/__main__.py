"""``python -m bench.projector``: see the package's docstring."""

from bench.projector.command import cli

if __name__ == "__main__":
    cli()
