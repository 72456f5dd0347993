"""Backend choice and http backend settings from the environment: defaults, per-kind choice, errors
that name the variable, and a token that never shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.generation.backends.http import HttpBackendSettings
from services.generation.backends.selection import BackendSettings
from services.generation.config import WorkerSettings
from shared.http_headers import parse_retry_after
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV

URL = "https://api.example.com/v1"


def test_procedural_renders_everything_by_default() -> None:
    assert BackendSettings.from_env(Env({})) == BackendSettings("procedural", "procedural", None)


def test_http_per_kind_with_its_settings() -> None:
    env = Env(
        {
            "RENDERFLOW_BACKEND": "http",
            "RENDERFLOW_BACKEND_VIDEO": "procedural",
            "RENDERFLOW_BACKEND_HTTP_URL": URL,
            "RENDERFLOW_BACKEND_HTTP_TOKEN": "t0ken",
            "RENDERFLOW_BACKEND_HTTP_POLL_S": "0.25",
            "RENDERFLOW_BACKEND_HTTP_MAX_WAIT_S": "120",
        }
    )
    settings = BackendSettings.from_env(env)
    assert (settings.image, settings.video) == ("http", "procedural")
    assert settings.http == HttpBackendSettings(url=URL, token="t0ken", poll_s=0.25, max_wait_s=120)


HTTP = {"RENDERFLOW_BACKEND": "http", "RENDERFLOW_BACKEND_HTTP_URL": URL}


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RENDERFLOW_BACKEND": "replicate"}, "RENDERFLOW_BACKEND"),
        ({"RENDERFLOW_BACKEND_IMAGE": "http"}, "RENDERFLOW_BACKEND_HTTP_URL"),
        ({**HTTP, "RENDERFLOW_BACKEND_HTTP_URL": "ftp://x"}, "RENDERFLOW_BACKEND_HTTP_URL"),
        ({**HTTP, "RENDERFLOW_BACKEND_HTTP_POLL_S": "0"}, "RENDERFLOW_BACKEND_HTTP_POLL_S"),
    ],
)
def test_bad_settings_name_their_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        BackendSettings.from_env(Env(environ))


def test_credentials_in_the_url_are_refused_without_being_echoed() -> None:
    env = Env(
        {"RENDERFLOW_BACKEND": "http", "RENDERFLOW_BACKEND_HTTP_URL": "https://u:hunter2@api.example.com"}
    )
    with pytest.raises(ConfigError, match="RENDERFLOW_BACKEND_HTTP_TOKEN") as caught:
        BackendSettings.from_env(env)
    assert "hunter2" not in str(caught.value)


def test_the_token_never_shows_in_the_worker_settings() -> None:
    env = Env(
        {
            **HTTP,
            "DATABASE_URL": "postgresql://localhost/x",
            "RENDERFLOW_BACKEND_HTTP_TOKEN": "t0ken-s3cret",
            **TOKEN_ENV,
        }
    )
    settings = WorkerSettings.from_env(env)
    assert settings.backend.http is not None and settings.backend.http.token == "t0ken-s3cret"
    assert "t0ken-s3cret" not in repr(settings)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("7") == 7.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (parse_retry_after(later) or 0) <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
