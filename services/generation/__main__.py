"""Entry point of the generation gRPC server: `python -m services.generation`."""

from __future__ import annotations

from services.generation.config import Settings
from services.generation.server import running
from shared.lifecycle import run_process
from shared.settings import Env

METRICS_PORT = 9103
"""Where `/metrics` is served unless RENDERFLOW_METRICS_PORT says otherwise."""


def main() -> None:
    """The generation server process."""
    env = Env()
    settings = Settings.from_env(env)
    run_process(
        "generation",
        env,
        lambda: running(settings),
        log_level=env.str("RENDERFLOW_LOG_LEVEL", "INFO"),
        metrics_port=METRICS_PORT,
    )


if __name__ == "__main__":
    main()
