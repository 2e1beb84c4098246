"""``python -m query_service``: serve the query API (same as ``kessai query-api``)."""

from kessai.cli import run_query_api

if __name__ == "__main__":
    run_query_api()
