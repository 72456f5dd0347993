"""Entry point of the image-fetch service: `python -m services.imagefetch`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.imagefetch.config import Settings
from services.imagefetch.server import running
from shared.lifecycle import run_process
from shared.settings import Env

METRICS_PORT = 9102
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""
log = logging.getLogger("services.imagefetch")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[int]:
    """The service, announcing what it serves with (the cache backend, the allow-list)."""
    async with running(settings) as port:
        cache = "redis" if settings.cache_url else "memory"
        log.info("serving", extra={"port": port, "cache": cache, "allow": [str(n) for n in settings.allow]})
        yield port


def main() -> None:
    """Runs the service until SIGTERM or SIGINT."""
    env = Env()
    settings = Settings.from_env(env)
    run_process(
        "imagefetch",
        env,
        lambda: serving(settings),
        log_level=env.str("RENDERFLOW_LOG_LEVEL", "INFO"),
        metrics_port=METRICS_PORT,
    )


if __name__ == "__main__":
    main()
