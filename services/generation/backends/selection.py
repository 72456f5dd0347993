"""Which backend renders which kind, as the settings choose, and the backends a worker opens.

A worker stamps each job it claims with the backend its settings choose for the job's kind, and
runs it with that backend: the job row and the render's span name the one really used."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from services.generation.backends import Backend
from services.generation.backends.http import HttpBackend, HttpBackendSettings
from services.generation.backends.openai_images import OpenAiImagesBackend, OpenAiImagesSettings
from services.generation.backends.procedural import ProceduralBackend
from shared.settings import ConfigError, Env

NAMES = ("procedural", "http", "openai")
_URL_SETTINGS = {"http": "RENDERFLOW_BACKEND_HTTP_URL", "openai": "RENDERFLOW_BACKEND_OPENAI_URL"}


@dataclass(frozen=True)
class BackendSettings:
    """Which backend renders each kind, and how to reach the external one."""

    image: str = "procedural"
    """RENDERFLOW_BACKEND_IMAGE: `procedural`, `http` or `openai`; default RENDERFLOW_BACKEND (default
    `procedural`)."""
    video: str = "procedural"
    """RENDERFLOW_BACKEND_VIDEO: `procedural` or `http`; default RENDERFLOW_BACKEND."""
    http: HttpBackendSettings | None = None
    """RENDERFLOW_BACKEND_HTTP_*: the prediction API; read (and required) when a kind uses `http`."""
    openai: OpenAiImagesSettings | None = None
    """RENDERFLOW_BACKEND_OPENAI_*: the OpenAI-compatible images API; read (and required) when images
    use `openai`."""

    @classmethod
    def from_env(cls, env: Env) -> BackendSettings:
        default = _name(env, "RENDERFLOW_BACKEND", "procedural")
        image = _name(env, "RENDERFLOW_BACKEND_IMAGE", default)
        video = _name(env, "RENDERFLOW_BACKEND_VIDEO", default)
        if video == "openai":
            raise ConfigError(
                "the openai backend makes images only: RENDERFLOW_BACKEND_VIDEO cannot be openai"
            )
        http = HttpBackendSettings.from_env(env) if "http" in (image, video) else None
        openai = OpenAiImagesSettings.from_env(env) if image == "openai" else None
        return cls(image=image, video=video, http=http, openai=openai)

    def by_kind(self) -> dict[str, str]:
        """{kind: the name of the backend that renders it}."""
        return {"image": self.image, "video": self.video}


def _name(env: Env, variable: str, default: str) -> str:
    name = env.str(variable, default).strip().lower()
    if name not in NAMES:
        raise ConfigError(f"{variable} must be one of {', '.join(NAMES)}, got {name!r}")
    return name


@asynccontextmanager
async def open_backends(
    settings: BackendSettings, procedural_step_ms: float = 0.0
) -> AsyncIterator[dict[str, Backend]]:
    """The worker's backends by name (those its kinds use); the http backend's session is closed on
    exit."""
    async with AsyncExitStack() as stack:
        available: dict[str, Backend] = {"procedural": ProceduralBackend(procedural_step_ms)}
        if settings.http is not None:
            available["http"] = await stack.enter_async_context(HttpBackend.open(settings.http))
        if settings.openai is not None:
            available["openai"] = await stack.enter_async_context(OpenAiImagesBackend.open(settings.openai))
        used = set(settings.by_kind().values())
        missing = used - available.keys()
        if missing:
            needs = ", ".join(_URL_SETTINGS[name] for name in sorted(missing))
            raise ConfigError(f"the {', '.join(sorted(missing))} backend needs {needs}")
        yield {name: available[name] for name in used}
