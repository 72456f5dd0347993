"""Which backend renders which kind, as the settings choose, and the backends a worker opens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from services.generation.backends import (
    Artifact,
    Backend,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)
from services.generation.backends.http import HttpBackend, HttpBackendSettings
from services.generation.backends.procedural import ProceduralBackend
from shared.settings import ConfigError, Env

NAMES = ("procedural", "http")
# The backend name the generation store stamps on every job today. The worker resolves it per
# kind, so that the choice is a worker setting.
JOB_BACKEND = "procedural"


@dataclass(frozen=True)
class BackendSettings:
    """Which backend renders each kind, and how to reach the external one."""

    image: str = "procedural"
    """RENDERFLOW_BACKEND_IMAGE: `procedural` or `http`; default RENDERFLOW_BACKEND (default
    `procedural`)."""
    video: str = "procedural"
    """RENDERFLOW_BACKEND_VIDEO: `procedural` or `http`; default RENDERFLOW_BACKEND."""
    http: HttpBackendSettings | None = None
    """RENDERFLOW_HTTP_BACKEND_*: the prediction API; read (and required) when a kind uses `http`."""

    @classmethod
    def from_env(cls, env: Env) -> BackendSettings:
        default = _name(env, "RENDERFLOW_BACKEND", "procedural")
        image = _name(env, "RENDERFLOW_BACKEND_IMAGE", default)
        video = _name(env, "RENDERFLOW_BACKEND_VIDEO", default)
        http = HttpBackendSettings.from_env(env) if "http" in (image, video) else None
        return cls(image=image, video=video, http=http)


def _name(env: Env, variable: str, default: str) -> str:
    name = env.str(variable, default).strip().lower()
    if name not in NAMES:
        raise ConfigError(f"{variable} must be one of {', '.join(NAMES)}, got {name!r}")
    return name


class ByKind:
    """Hands each render to the backend chosen for its kind."""

    name = "by-kind"

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        backend = self._backends.get(job.kind)
        if backend is None:
            raise PermanentBackendError(f"no backend renders {job.kind}", "unsupported_kind")
        return await backend.generate(job, on_progress)


@asynccontextmanager
async def open_backends(
    settings: BackendSettings, procedural_step_ms: float = 0.0
) -> AsyncIterator[dict[str, Backend]]:
    """The worker's backends by the name jobs carry; the http backend's session is closed on exit."""
    async with AsyncExitStack() as stack:
        available: dict[str, Backend] = {"procedural": ProceduralBackend(procedural_step_ms)}
        if settings.http is not None:
            available["http"] = await stack.enter_async_context(HttpBackend.open(settings.http))
        missing = {settings.image, settings.video} - available.keys()
        if missing:
            raise ConfigError(f"the {', '.join(sorted(missing))} backend needs RENDERFLOW_HTTP_BACKEND_URL")
        yield {JOB_BACKEND: ByKind({"image": available[settings.image], "video": available[settings.video]})}
