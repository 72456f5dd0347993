"""Entry point of the image-fetch service: `python -m services.imagefetch`."""

from __future__ import annotations

import asyncio
import logging

from services.imagefetch.config import Settings
from services.imagefetch.server import running
from shared.lifecycle import wait_for_shutdown_signal
from shared.logs import setup_logging
from shared.settings import Env, run_dir
from shared.telemetry import setup_telemetry

SERVICE = "imagefetch"
METRICS_PORT = 9102
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""
log = logging.getLogger("services.imagefetch")


async def main() -> None:
    env = Env()
    settings = Settings.from_env(env)
    setup_logging(SERVICE, env.str("RENDERFLOW_LOG_LEVEL", "INFO"))
    telemetry = setup_telemetry(SERVICE, env, run_dir(env), metrics_port=METRICS_PORT)
    try:
        async with running(settings) as port:
            log.info(
                "serving",
                extra={
                    "port": port,
                    "cache": "redis" if settings.cache_url else "memory",
                    "allow": [str(net) for net in settings.allow],
                },
            )
            await wait_for_shutdown_signal()
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
