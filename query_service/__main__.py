"""``python -m query_service``: serve the query API (same as ``kessai query-api``)."""

from kessai.runtime import serve_app
from kessai.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    serve_app(
        "query_service.app:create_served_app", settings.query_api_host, settings.query_api_port
    )
