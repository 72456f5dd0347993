"""Worker and server settings of the queue's limits, read from the environment."""

from __future__ import annotations

import pytest

from services.generation.config import Settings, WorkerSettings
from services.generation.pacing import parse_rates
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV


def test_limits_have_defaults_and_read_their_variables() -> None:
    base = {"DATABASE_URL": "postgresql://x/y", **TOKEN_ENV}
    worker = WorkerSettings.from_env(Env(base))
    server = Settings.from_env(Env(base))
    assert (worker.tenant_max_running, worker.backend_rate_limits) == (8, {})
    assert (worker.max_duration_image_s, worker.max_duration_video_s) == (300.0, 1800.0)
    assert (server.max_active_renders, server.prefetch_addr) == (200, "127.0.0.1:50052")

    worker = WorkerSettings.from_env(
        Env(
            {
                **base,
                "RENDERFLOW_WORKER_TENANT_MAX_RUNNING": "2",
                "RENDERFLOW_BACKEND_RATE_LIMITS": "procedural=0, http=2.5",
                "RENDERFLOW_WORKER_MAX_DURATION_IMAGE_S": "30",
            }
        )
    )
    server = Settings.from_env(
        Env({**base, "RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS": "0", "RENDERFLOW_GENERATION_PREFETCH": "no"})
    )
    assert worker.tenant_max_running == 2 and worker.max_duration_image_s == 30.0
    assert worker.backend_rate_limits == {"procedural": 0.0, "http": 2.5}
    assert (server.max_active_renders, server.prefetch_addr) == (0, "")


@pytest.mark.parametrize("item", ["http", "http=", "=5", "http=fast", "http=-1"])
def test_a_malformed_rate_limit_names_the_variable(item: str) -> None:
    with pytest.raises(ConfigError, match="RENDERFLOW_BACKEND_RATE_LIMITS"):
        parse_rates([item], "RENDERFLOW_BACKEND_RATE_LIMITS")
