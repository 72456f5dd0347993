"""What the tests of the provider backends share: a backend connected to its stand-in server, and a
render generated with the steps it reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from services.generation.backends import (
    Artifact,
    Backend,
    GenerationInput,
    ProgressCallback,
    TransientBackendError,
)
from services.generation.backends.procedural import ProceduralBackend


class _Served(Protocol):
    @property
    def url(self) -> str: ...


ServerT = TypeVar("ServerT", bound=_Served)
BackendT = TypeVar("BackendT")
SettingsT = TypeVar("SettingsT")


@asynccontextmanager
async def connector(
    stand_in: Callable[..., AbstractAsyncContextManager[ServerT]],
    open_backend: Callable[[SettingsT], AbstractAsyncContextManager[BackendT]],
    settings: SettingsT,
) -> AsyncIterator[Callable[..., Awaitable[tuple[ServerT, BackendT]]]]:
    """`start(settings={...}, **behaviour)` -> (a stand-in started with `behaviour`, a backend of
    `settings` changed as given and pointed at it); everything started is closed on exit."""
    async with AsyncExitStack() as stack:

        async def start(settings: dict[str, Any] | None = None, **behaviour: Any) -> tuple[ServerT, BackendT]:
            server = await stack.enter_async_context(stand_in(**behaviour))
            chosen = replace(base, url=server.url, **(settings or {}))  # type: ignore[type-var]
            return server, await stack.enter_async_context(open_backend(chosen))

        base = settings
        yield start


async def generate(backend: Backend, job: GenerationInput) -> tuple[Artifact, list[int]]:
    """The artifact `backend` makes of `job`, and the steps it reported on the way."""
    steps: list[int] = []

    async def progress(step: int, total: int) -> None:
        assert total == job.steps
        steps.append(step)

    return await backend.generate(job, progress), steps


class FlakyBackend:
    """The procedural backend, whose first attempt at each `flaky...` prompt fails as an overloaded
    provider would (a transient failure: the render is retried)."""

    name = "flaky"

    def __init__(self) -> None:
        self._inner = ProceduralBackend()
        self._failed: set[str] = set()

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        if job.prompt.startswith("flaky") and job.render_id not in self._failed:
            self._failed.add(job.render_id)
            raise TransientBackendError("the provider is overloaded", "overloaded")
        return await self._inner.generate(job, on_progress)
