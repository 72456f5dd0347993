"""Entry point of the metadata service: `python -m services.metadata`."""

from __future__ import annotations

import asyncio

from shared.lifecycle import wait_for_shutdown_signal
from shared.logs import setup_logging
from shared.settings import Env, run_dir
from shared.telemetry import setup_telemetry

from .config import Settings
from .server import running

METRICS_PORT = 9101
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""


async def main() -> None:
    """Runs the service until SIGTERM or SIGINT."""
    env = Env()
    settings = Settings.from_env(env)
    setup_logging("metadata", settings.log_level)
    telemetry = setup_telemetry("metadata", env, run_dir(env), metrics_port=METRICS_PORT)
    try:
        async with running(settings):
            await wait_for_shutdown_signal()
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
