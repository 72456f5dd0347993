"""Generator backends behind one small interface, and the errors they classify.

A backend turns a `GenerationInput` into an `Artifact`, reporting each step through
`on_progress(step, total)`. It is stopped by cancelling the task that awaits it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

ProgressCallback = Callable[[int, int], Awaitable[None]]


@dataclass(frozen=True)
class GenerationInput:
    """Everything a backend needs for one render."""

    render_id: str
    kind: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    rules: tuple[str, ...] = ()
    reference: bytes | None = None
    duration_s: float = 0.0
    fps: int = 0
    workflow: str = ""
    """The workflow (or model) the render asks for by name, among those the operator registered;
    empty: its backend's default."""
    deadline: datetime | None = None
    """When the render ends unstarted or is stopped (the render's `deadline`), if it has one: a
    provider with a queue of its own may be told not to start it later."""
    workdir: Path | None = None
    """A directory of the attempt's own, where a video is written as a file (`Artifact.file`)
    rather than held in memory; the runner stores it from there and removes the directory. None:
    the output comes back as bytes."""

    def output_file(self) -> Path | None:
        """Where the output goes when it is to be a file (a video, with a workdir); else None."""
        return self.workdir / "output" if self.workdir is not None and self.kind == "video" else None


@dataclass(frozen=True)
class Artifact:
    """A generated output."""

    data: bytes
    content_type: str
    width: int
    height: int
    duration_s: float = 0.0
    provider_request_id: str = ""
    """The provider's own id of the request that made it, when there is a provider."""
    file: Path | None = None
    """The output's file in the render's workdir, when it was written there (`data` is then empty)."""

    @property
    def content(self) -> bytes | Path:
        """The output, as the store takes it: its file, or its bytes."""
        return self.file or self.data


class StepProgress:
    """A provider's progress (a fraction, 0..1) reported as the render's steps: when it moves on a
    step, and short of the last, which is reported once the output is in hand."""

    def __init__(self, steps: int, on_progress: ProgressCallback) -> None:
        self._steps = steps
        self._on_progress = on_progress
        self._reported = 0

    async def report(self, fraction: float | None) -> None:
        if fraction is None:
            return
        step = min(self._steps - 1, math.floor(max(0.0, min(1.0, fraction)) * self._steps))
        if step > self._reported:
            self._reported = step
            await self._on_progress(step, self._steps)

    async def done(self) -> None:
        """The last step: the output is in hand."""
        await self._on_progress(self._steps, self._steps)


class BackendError(Exception):
    """A backend could not generate; `transient` says whether another attempt may succeed;
    `provider_request_id`: the provider's id of the request that failed, when known."""

    transient = False

    def __init__(self, message: str, reason: str = "backend_error", provider_request_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.provider_request_id = provider_request_id


class TransientBackendError(BackendError):
    """A failure worth retrying later (provider overloaded, connection lost, timeout)."""

    transient = True


class PermanentBackendError(BackendError):
    """A failure that would repeat on every attempt (invalid input, unsupported request)."""


class Backend(Protocol):
    """A generator of images (and later videos)."""

    name: str

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Generates the output, awaiting `on_progress(step, total)` once per step."""
        ...
