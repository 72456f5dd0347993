"""Which backend renders which kind, as the settings choose, and the backends a worker opens.

A worker stamps each job it claims with the backend its settings choose for the job's kind, and
runs it with that backend: the job row and the render's span name the one really used."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from services.generation.backends import Backend
from services.generation.backends.comfyui import ComfyUIBackend, ComfyUISettings
from services.generation.backends.fal import FalBackend, FalSettings
from services.generation.backends.http import HttpBackend, HttpBackendSettings
from services.generation.backends.openai_images import OpenAiImagesBackend, OpenAiImagesSettings
from services.generation.backends.procedural import ProceduralBackend
from services.generation.backends.replicate import ReplicateBackend, ReplicateSettings
from shared.contract import KINDS
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
    projects: dict[str, dict[str, str]] = field(default_factory=dict)
    """RENDERFLOW_BACKEND_PROJECTS: projects whose renders another backend makes, as JSON keyed by
    project id (`GET /v1/projects/{slug}` shows it): a backend for both kinds, or one per kind, e.g.
    `{"0b6f...": "comfyui", "5e1a...": {"image": "replicate"}}`; a kind it does not name keeps the
    worker's backend."""

    @classmethod
    def from_env(cls, env: Env) -> BackendSettings:
        default = _name(env, "RENDERFLOW_BACKEND", "procedural")
        image = _name(env, "RENDERFLOW_BACKEND_IMAGE", default)
        video = _name(env, "RENDERFLOW_BACKEND_VIDEO", default)
        if video in _IMAGES_ONLY:
            raise ConfigError(
                f"the {video} backend makes images only: RENDERFLOW_BACKEND_VIDEO cannot be {video}"
            )
        projects = _projects(env)
        if any(kinds.get("video") in _IMAGES_ONLY for kinds in projects.values()):
            raise ConfigError(f"RENDERFLOW_BACKEND_PROJECTS: {', '.join(_IMAGES_ONLY)} makes images only")
        used = {image, video} | {name for kinds in projects.values() for name in kinds.values()}
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
            projects=projects,
        )

    def by_kind(self) -> dict[str, str]:
        """{kind: the name of the backend that renders it}."""
        return {"image": self.image, "video": self.video}

    def used(self) -> set[str]:
        """The backends some render may be made with."""
        per_project = {name for kinds in self.projects.values() for name in kinds.values()}
        return set(self.by_kind().values()) | per_project

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
    return _known(env.str(variable, default), variable)


def _known(name: str, variable: str) -> str:
    name = name.strip().lower()
    if name not in NAMES:
        raise ConfigError(f"{variable} must name one of {', '.join(NAMES)}, got {name!r}")
    return name


def _projects(env: Env) -> dict[str, dict[str, str]]:
    """RENDERFLOW_BACKEND_PROJECTS as {project id: {kind: backend}}."""
    variable = "RENDERFLOW_BACKEND_PROJECTS"
    text = env.optional(variable)
    if text is None:
        return {}
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{variable} is not JSON: {exc}") from None
    if not isinstance(given, dict):
        raise ConfigError(f"{variable} must be a JSON object keyed by project id")
    projects: dict[str, dict[str, str]] = {}
    for project, chosen in given.items():
        kinds = dict.fromkeys(KINDS, chosen) if isinstance(chosen, str) else chosen
        if not isinstance(kinds, dict) or not kinds or not set(kinds) <= set(KINDS):
            raise ConfigError(
                f"{variable}: project {project!r} needs a backend, or one per kind ({', '.join(KINDS)})"
            )
        projects[project] = {
            kind: _known(str(name), f"{variable}[{project!r}]") for kind, name in kinds.items()
        }
    return projects


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
        used = settings.used()
        missing = sorted(used - available.keys())
        if missing:
            raise ConfigError(
                f"the {', '.join(missing)} backend has no settings (RENDERFLOW_BACKEND_<NAME>_*)"
            )
        yield {name: available[name] for name in used}
