"""Entry point of the metadata service: `python -m services.metadata`."""

from __future__ import annotations

from services.metadata.config import Settings
from services.metadata.server import running
from shared.lifecycle import run_process
from shared.settings import Env

METRICS_PORT = 9101
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""


def main() -> None:
    """Runs the service until SIGTERM or SIGINT."""
    env = Env()
    settings = Settings.from_env(env)
    run_process(
        "metadata", env, lambda: running(settings), log_level=settings.log_level, metrics_port=METRICS_PORT
    )


if __name__ == "__main__":
    main()
