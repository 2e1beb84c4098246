"""``python -m kessai_cli``: the ``kessai`` command."""

from kessai_cli.main import main

if __name__ == "__main__":
    main()
