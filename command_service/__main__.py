"""``python -m command_service``: serve the command API (same as ``kessai command-api``)."""

from kessai.cli import run_command_api

if __name__ == "__main__":
    run_command_api()
