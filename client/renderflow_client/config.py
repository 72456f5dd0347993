"""Where the client finds the gateway and its key: arguments first, then RENDERFLOW_URL,
RENDERFLOW_API_KEY and RENDERFLOW_PROJECT, then a small TOML file
(`$XDG_CONFIG_HOME/renderflow/config.toml`, by default `~/.config/renderflow/config.toml`):

    url = "https://renderflow.example.com"
    api_key = "rf_..."
    project = "demo"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Config:
    url: str = DEFAULT_URL
    api_key: str | None = None
    project: str | None = None
    """The project renders go to when a call names none."""

    def __repr__(self) -> str:  # never the key
        return (
            f"Config(url={self.url!r}, project={self.project!r}, api_key={'set' if self.api_key else None})"
        )


def config_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(env.get("RENDERFLOW_CONFIG") or Path(base) / "renderflow" / "config.toml")


def load_config(
    url: str | None = None,
    api_key: str | None = None,
    project: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> Config:
    """The settings from the arguments, else the environment, else the file (missing: none)."""
    env = os.environ if env is None else env
    path = file or config_file(env)
    stored: dict[str, object] = {}
    if path.is_file():
        with path.open("rb") as handle:
            stored = tomllib.load(handle)

    def pick(given: str | None, variable: str, key: str) -> str | None:
        value = given or env.get(variable) or stored.get(key)
        return str(value) if value else None

    return Config(
        url=(pick(url, "RENDERFLOW_URL", "url") or DEFAULT_URL).rstrip("/"),
        api_key=pick(api_key, "RENDERFLOW_API_KEY", "api_key"),
        project=pick(project, "RENDERFLOW_PROJECT", "project"),
    )
