"""``python -m command_service``: serve the command API (same as ``kessai command-api``)."""

from kessai.runtime import serve_app
from kessai.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    serve_app(
        "command_service.app:create_served_app",
        settings.command_api_host,
        settings.command_api_port,
    )
