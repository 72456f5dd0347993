"""Settings of the image-fetch service from the environment."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from services.imagefetch.config import MIB, Settings
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_env(Env(TOKEN_ENV))
    assert settings.deadline_s == 5.0
    assert settings.max_bytes == 20 * MIB
    assert settings.max_redirects == 3
    assert settings.allow == ()
    assert settings.cache_url is None
    assert settings.listen == "127.0.0.1:50052"


def test_the_allow_list_and_cache_come_from_the_environment() -> None:
    settings = Settings.from_env(
        Env(
            {
                "RENDERFLOW_IMAGEFETCH_ALLOW": "127.0.0.1, 10.0.0.0/8,::1",
                "RENDERFLOW_CACHE_URL": "redis://:pw@cache:6380/2",
                "RENDERFLOW_IMAGEFETCH_DEADLINE_S": "2.5",
                "RENDERFLOW_IMAGEFETCH_ADDR": "0.0.0.0:6000",
                **TOKEN_ENV,
            }
        )
    )
    assert settings.allow == (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("::1/128"))
    assert settings.cache_url == "redis://:pw@cache:6380/2"
    assert settings.deadline_s == 2.5
    assert settings.listen == "0.0.0.0:6000"


def test_a_bad_allow_list_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"RENDERFLOW_IMAGEFETCH_ALLOW.*localhost"):
        Settings.from_env(Env({"RENDERFLOW_IMAGEFETCH_ALLOW": "localhost"}))


def test_a_bad_cache_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError, match="RENDERFLOW_CACHE_URL") as caught:
        Settings.from_env(Env({"RENDERFLOW_CACHE_URL": "memcached://:hunter2@cache:11211"}))
    assert "hunter2" not in str(caught.value)
