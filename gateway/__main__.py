"""`python -m gateway`: serve the HTTP gateway until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

from gateway.app import running
from gateway.config import Settings
from shared.lifecycle import run_process
from shared.settings import Env


def main() -> None:
    """The gateway process (it serves `/metrics` on its own port)."""
    env = Env()
    settings = Settings.from_env(env)
    run_process("gateway", env, lambda: running(settings), log_level=settings.log_level)


if __name__ == "__main__":
    main()
