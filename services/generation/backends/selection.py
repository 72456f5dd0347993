"""Which backend renders which kind, as the settings choose, and the backends a worker opens.

A worker stamps each job it claims with the backend its settings choose for the job's kind, and
runs it with that backend: the job row and the render's span name the one really used."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from services.generation.backends import Backend
from services.generation.backends.comfyui import ComfyUIBackend, ComfyUISettings
from services.generation.backends.fal import FalBackend, FalSettings
from services.generation.backends.http import HttpBackend, HttpBackendSettings
from services.generation.backends.openai_images import OpenAiImagesBackend, OpenAiImagesSettings
from services.generation.backends.procedural import ProceduralBackend
from services.generation.backends.replicate import ReplicateBackend, ReplicateSettings
from shared.settings import ConfigError, Env

NAMES = ("procedural", "http", "openai", "comfyui", "replicate", "fal")
_IMAGES_ONLY = frozenset({"openai"})


@dataclass(frozen=True)
class BackendSettings:
    """Which backend renders each kind, and how to reach the external ones."""

    image: str = "procedural"
    """RENDERFLOW_BACKEND_IMAGE: `procedural`, `http`, `openai`, `comfyui`, `replicate` or `fal`;
    default RENDERFLOW_BACKEND (default `procedural`)."""
    video: str = "procedural"
    """RENDERFLOW_BACKEND_VIDEO: any of those but `openai`; default RENDERFLOW_BACKEND."""
    http: HttpBackendSettings | None = None
    """RENDERFLOW_BACKEND_HTTP_*: the prediction API; read (and required) when a kind uses `http`."""
    openai: OpenAiImagesSettings | None = None
    """RENDERFLOW_BACKEND_OPENAI_*: the OpenAI-compatible images API; read (and required) when images
    use `openai`."""
    comfyui: ComfyUISettings | None = None
    """RENDERFLOW_BACKEND_COMFYUI_*: the ComfyUI instances and workflows; read (and required) when a
    kind uses `comfyui`."""
    replicate: ReplicateSettings | None = None
    """RENDERFLOW_BACKEND_REPLICATE_*: Replicate's API and model; read (and required) when a kind uses
    `replicate`."""
    fal: FalSettings | None = None
    """RENDERFLOW_BACKEND_FAL_*: fal's queue API and model; read (and required) when a kind uses `fal`."""

    @classmethod
    def from_env(cls, env: Env) -> BackendSettings:
        default = _name(env, "RENDERFLOW_BACKEND", "procedural")
        image = _name(env, "RENDERFLOW_BACKEND_IMAGE", default)
        video = _name(env, "RENDERFLOW_BACKEND_VIDEO", default)
        if video in _IMAGES_ONLY:
            raise ConfigError(
                f"the {video} backend makes images only: RENDERFLOW_BACKEND_VIDEO cannot be {video}"
            )
        used = {image, video}
        comfyui = ComfyUISettings.from_env(env) if "comfyui" in used else None
        if video == "comfyui" and comfyui is not None and not comfyui.workflows.video:
            raise ConfigError(
                "videos made by comfyui need a workflow: set RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_VIDEO"
            )
        return cls(
            image=image,
            video=video,
            http=HttpBackendSettings.from_env(env) if "http" in used else None,
            openai=OpenAiImagesSettings.from_env(env) if "openai" in used else None,
            comfyui=comfyui,
            replicate=ReplicateSettings.from_env(env) if "replicate" in used else None,
            fal=FalSettings.from_env(env) if "fal" in used else None,
        )

    def by_kind(self) -> dict[str, str]:
        """{kind: the name of the backend that renders it}."""
        return {"image": self.image, "video": self.video}

    def openers(self) -> dict[str, tuple[Any, Callable[[Any], AbstractAsyncContextManager[Backend]]]]:
        """{name: (its settings or None, what opens it)} of the external backends."""
        return {
            "http": (self.http, HttpBackend.open),
            "openai": (self.openai, OpenAiImagesBackend.open),
            "comfyui": (self.comfyui, ComfyUIBackend.open),
            "replicate": (self.replicate, ReplicateBackend.open),
            "fal": (self.fal, FalBackend.open),
        }


def _name(env: Env, variable: str, default: str) -> str:
    name = env.str(variable, default).strip().lower()
    if name not in NAMES:
        raise ConfigError(f"{variable} must be one of {', '.join(NAMES)}, got {name!r}")
    return name


@asynccontextmanager
async def open_backends(
    settings: BackendSettings, procedural_step_ms: float = 0.0
) -> AsyncIterator[dict[str, Backend]]:
    """The worker's backends by name (those its kinds use), open until exit."""
    async with AsyncExitStack() as stack:
        available: dict[str, Backend] = {"procedural": ProceduralBackend(procedural_step_ms)}
        for name, (chosen, opener) in settings.openers().items():
            if chosen is not None:
                available[name] = await stack.enter_async_context(opener(chosen))
        used = set(settings.by_kind().values())
        missing = sorted(used - available.keys())
        if missing:
            raise ConfigError(
                f"the {', '.join(missing)} backend has no settings (RENDERFLOW_BACKEND_<NAME>_*)"
            )
        yield {name: available[name] for name in used}
