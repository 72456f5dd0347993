"""Settings of the metadata service from the environment."""

from __future__ import annotations

import pytest

from services.metadata.config import Settings
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV


def test_defaults_and_overrides() -> None:
    settings = Settings.from_env(Env({"DATABASE_URL": "postgresql://db/renderflow", **TOKEN_ENV}))
    assert (settings.listen, settings.database_url) == ("127.0.0.1:50051", "postgresql://db/renderflow")
    assert settings.change_retention_s == 7 * 86_400
    moved = Settings.from_env(
        Env(
            {
                "DATABASE_URL": "postgresql://db/renderflow",
                "RENDERFLOW_METADATA_ADDR": "10.0.0.5:6000",
                "RENDERFLOW_METADATA_POOL_MAX": "30",
                **TOKEN_ENV,
            }
        )
    )
    assert (moved.listen, moved.pool_max_size) == ("10.0.0.5:6000", 30)
    bound = Settings.from_env(
        Env({"DATABASE_URL": "postgresql://db/x", "RENDERFLOW_METADATA_LISTEN": "0.0.0.0:7000", **TOKEN_ENV})
    )
    assert bound.listen == "0.0.0.0:7000"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://db/x", "RENDERFLOW_METADATA_POOL_MAX": "many"}, "POOL_MAX"),
        ({"DATABASE_URL": "postgresql://db/x", "RENDERFLOW_METADATA_POOL_MIN": "20"}, "POOL_MAX"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(Env(environ))
