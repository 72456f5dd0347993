"""What each side of generation needs of the store: the API side (the servicer's `Renders`) and
the worker side (the job runner, its references and pacing). Each depends on its protocol, so
that neither reaches for the other's operations; `store.Store` is both."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from services.generation.catalog import Placement
from services.generation.domain import (
    Batch,
    Cancelled,
    Event,
    NewEvent,
    Output,
    Page,
    ReferenceOutcome,
    Render,
    RenderError,
    RenderFilter,
    RenderSpec,
    Submission,
)
from services.generation.eta import QueueSnapshot, Sample
from services.generation.jobs import Claim, Rescued


class ApiStore(Protocol):
    """Submitting, reading, listing, cancelling and watching a user's renders and batches."""

    async def submit(
        self, spec: RenderSpec, placement: Placement, submission: Submission, started: float
    ) -> Render: ...

    async def submit_batch(
        self, specs: list[RenderSpec], placements: list[Placement], submission: Submission, started: float
    ) -> Batch: ...

    async def chain_lengths(self, user_id: str, chain_ids: list[str]) -> dict[str, int]: ...

    async def get(self, user_id: str, render_id: str) -> Render: ...

    async def queue_snapshot(self, user_id: str) -> QueueSnapshot: ...

    async def recent_run_times(self) -> list[Sample]: ...

    async def list_page(self, user_id: str, where: RenderFilter, size: int, page_token: str) -> Page: ...

    async def cancel(self, user_id: str, render_id: str) -> Cancelled: ...

    async def cancel_batch(self, user_id: str, batch_id: str) -> bool: ...

    async def set_priority(self, user_id: str, render_id: str, priority: int) -> None: ...

    async def delete_output(
        self, user_id: str, render_id: str, delete_file: Callable[[str], Awaitable[None]]
    ) -> None: ...

    async def events_after(self, render_id: str, after_seq: int) -> list[Event]: ...

    async def events_after_many(self, cursors: Mapping[str, int], limit: int = ...) -> list[Event]: ...

    async def get_batch(self, user_id: str, batch_id: str) -> Batch: ...


class RenderSource(Protocol):
    """The renders a worker reads: those it takes references from (the one it runs comes with its
    claim)."""

    async def get(self, user_id: str, render_id: str) -> Render: ...

    async def continues_from(self, user_id: str, chain_id: str, position: int) -> Render | None: ...


class WorkerStore(RenderSource, Protocol):
    """The job queue as a worker runs it: claims, leases, fenced writes, ends and hand-backs,
    housekeeping, and the backends' shared pacing."""

    async def claim(self, worker_id: str, limit: int) -> list[Claim]: ...

    async def worker_seen(self, worker_id: str, slots: int) -> None: ...

    async def worker_gone(self, worker_id: str) -> None: ...

    async def heartbeat(self, claims: Sequence[Claim]) -> dict[str, bool]: ...

    async def progress(self, claim: Claim, events: Sequence[NewEvent], **changes: Any) -> bool: ...

    async def finish(
        self,
        claim: Claim,
        status: str,
        *,
        output: Output | None = None,
        error: RenderError | None = None,
        timings: dict[str, float] | None = None,
        message: str = "",
        before: Sequence[NewEvent] = (),
        reference: ReferenceOutcome | None = None,
        provider_request_id: str = "",
    ) -> bool: ...

    async def requeue(self, claim: Claim, delay_s: float, message: str, *, refund: bool = False) -> bool: ...

    async def rescue(self) -> Rescued: ...

    async def reserve_turn(self, backend: str, interval_s: float) -> float: ...
