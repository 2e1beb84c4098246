"""Process plumbing shared by the long-running components: logging and signal handling."""

from __future__ import annotations

import asyncio
import logging
import os
import signal


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("KESSAI_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def stop_on_signals() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, for a clean stop of the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
