"""``python -m bench.queries``: see the package's docstring."""

from bench.queries.command import cli

if __name__ == "__main__":
    cli()
