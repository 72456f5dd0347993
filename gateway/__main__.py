"""`python -m gateway`: serve the HTTP gateway until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import logging

from gateway.app import running
from gateway.config import Settings
from shared.lifecycle import wait_for_shutdown_signal
from shared.logs import setup_logging
from shared.settings import Env, run_dir
from shared.telemetry import setup_telemetry

log = logging.getLogger("gateway")


async def serve(settings: Settings) -> None:
    """Serves until a shutdown signal, then drains."""
    async with running(settings):
        received = await wait_for_shutdown_signal()
        log.info("shutting down", extra={"signal": received.name, "grace_s": settings.shutdown_grace_s})


def main() -> None:
    env = Env()
    settings = Settings.from_env(env)
    setup_logging("gateway", settings.log_level)
    telemetry = setup_telemetry("gateway", env, run_dir(env))
    try:
        asyncio.run(serve(settings))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
