"""Entry point of the generation gRPC server: `python -m services.generation`."""

from __future__ import annotations

import asyncio

from services.generation.config import Settings
from services.generation.server import running
from shared.lifecycle import wait_for_shutdown_signal
from shared.logs import setup_logging
from shared.settings import Env, run_dir
from shared.telemetry import setup_telemetry

METRICS_PORT = 9103
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""


async def serve(settings: Settings) -> None:
    """Serves until SIGTERM or SIGINT, then drains."""
    async with running(settings):
        await wait_for_shutdown_signal()


def main() -> None:
    """The generation server process."""
    env = Env()
    settings = Settings.from_env(env)
    setup_logging("generation", env.str("RENDERFLOW_LOG_LEVEL", "INFO"))
    telemetry = setup_telemetry("generation", env, run_dir(env), metrics_port=METRICS_PORT)
    try:
        asyncio.run(serve(settings))
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
