"""The generation service's API side as domain operations: what each RPC does, without protobuf."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

from opentelemetry import propagate, trace

from services.generation import eta
from services.generation.artifacts import ArtifactStore
from services.generation.catalog import Catalog, Placement
from services.generation.domain import (
    Batch,
    DownloadLink,
    Event,
    Output,
    Page,
    Render,
    RenderFilter,
    RenderSpec,
    Submission,
)
from services.generation.events import EventHub, follow
from services.generation.protocols import ApiStore
from services.generation.retention import Retention
from services.generation.uploads.api import Uploads
from services.generation.validation import normalized, normalized_batch
from services.generation.webhooks.receivers import Receivers
from shared.contract import PRIORITY, phase_attribute
from shared.errors import FailedPrecondition, FieldError, Gone, NotFound, ValidationFailed

T = TypeVar("T")

RUN_TIMES_TTL_S = 5.0
"""How long the model of recent run times is used before it is read again."""
RETRYABLE = frozenset({"failed", "cancelled", "expired"})
"""The statuses of a render that may be retried."""


class Renders:
    """Submitting, reading, cancelling and watching renders, on behalf of a user."""

    def __init__(
        self,
        store: ApiStore,
        catalog: Catalog,
        hub: EventHub,
        artifacts: ArtifactStore,
        stall_after_s: float,
        prefetch: Callable[[str], None] | None = None,
        retention: Retention | None = None,
        receivers: Receivers | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._hub = hub
        self._artifacts = artifacts
        self._stall_after_s = stall_after_s
        self._retention = retention or Retention()
        self._receivers = receivers or Receivers()
        self._uploads = uploads
        self._run_times: tuple[float, eta.Durations] | None = None
        """When the run-time model was read, and the model."""
        self._prefetch = prefetch
        """Starts fetching a reference URL in the background (not awaited), so that the worker
        finds it cached."""

    async def submit(self, spec: RenderSpec, submission: Submission) -> Render:
        """Queues one render (idempotently) in its project and chain, with the rules active there;
        returns it as stored. NotFound for a project or chain the user does not have."""
        valid = self._receivers.applied(self._retention.applied(normalized(spec)))
        await self._check_uploads(submission.user_id, [valid])
        placement, submission = await _db_phase(
            submission,
            self._catalog.place(submission.user_id, valid.project, valid.chain_id, submission.min_change_seq),
        )
        render = await self._store.submit(valid, placement, submission, time.perf_counter())
        self._prefetch_references([render])
        return self._derived(render)

    async def submit_batch(self, specs: list[RenderSpec], submission: Submission) -> Batch:
        """Queues every render of a batch, or none of them when one is invalid, names a project or
        chain the user does not have (422 naming its first item), or is over the quota."""
        valid = [
            self._receivers.applied(self._retention.applied(s, f"items[{i}]."), f"items[{i}].")
            for i, s in enumerate(normalized_batch(specs))
        ]
        await self._check_uploads(submission.user_id, valid, "items[{}].")
        placements, submission = await _db_phase(submission, self._placements(valid, submission))
        batch = await self._store.submit_batch(valid, placements, submission, time.perf_counter())
        self._prefetch_references(batch.renders)
        return replace(batch, renders=[self._derived(r) for r in batch.renders])

    async def _placements(self, specs: list[RenderSpec], submission: Submission) -> list[Placement]:
        """Each item's placement, resolved once per (project, chain); an unknown one is the fault of
        the first item naming it."""
        first: dict[tuple[str, str], int] = {}
        for index, spec in enumerate(specs):
            first.setdefault((spec.project, spec.chain_id), index)
        answers = await asyncio.gather(
            *(
                self._catalog.place(submission.user_id, project, chain_id, submission.min_change_seq)
                for project, chain_id in first
            ),
            return_exceptions=True,
        )
        placed: dict[tuple[str, str], Placement] = {}
        errors: list[FieldError] = []
        for (group, index), answer in zip(first.items(), answers, strict=True):
            if isinstance(answer, NotFound):
                field = "chain_id" if group[1] and "chain" in answer.message else "project"
                errors.append(FieldError(f"items[{index}].{field}", answer.message))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                placed[group] = answer
        if errors:
            raise ValidationFailed(f"{errors[0].field}: {errors[0].message}", errors)
        return [placed[(spec.project, spec.chain_id)] for spec in specs]

    async def _check_uploads(self, user_id: str, specs: list[RenderSpec], prefix: str = "") -> None:
        """ValidationFailed for each spec naming an upload that is not the user's or has expired
        (one query, and only when some spec names an upload)."""
        named = [
            (i, s.reference.upload_id) for i, s in enumerate(specs) if s.reference and s.reference.upload_id
        ]
        if not named:
            return
        if self._uploads is None:
            raise ValidationFailed.field(
                prefix.format(named[0][0]) + "reference.upload_id", "uploads are off"
            )
        fields = [prefix.format(i) + "reference.upload_id" for i, _ in named]
        await self._uploads.check_named(user_id, [upload_id for _, upload_id in named], fields)

    async def chain_lengths(self, user_id: str, chain_ids: list[str]) -> dict[str, int]:
        """How many positions each of the user's chains has allocated (those with none left out)."""
        return await self._store.chain_lengths(user_id, chain_ids)

    def _prefetch_references(self, renders: Iterable[Render]) -> None:
        if self._prefetch is None:
            return
        urls = {r.reference.url for r in renders if r.reference and r.reference.url and not r.terminal}
        for url in urls:
            self._prefetch(url)

    async def get(
        self, user_id: str, render_id: str, *, estimates: bool = True, download: bool = False
    ) -> Render:
        """The render; with `estimates`, its place in the queue and when it should start while
        queued, and when it should end while running; with `download`, a direct link to its
        output when the store gives one."""
        render = await self._store.get(user_id, render_id)
        if estimates:
            [render] = await self._with_estimates(user_id, [render])
        if download:
            [render] = await self._with_download_links([render])
        return self._derived(render)

    async def list(
        self, user_id: str, where: RenderFilter, page_size: int, page_token: str, *, download: bool = False
    ) -> Page:
        """One page of the user's renders (those queued with their place and expected start;
        with `download`, those with an output with a direct link to it, as `get`)."""
        page = await self._store.list_page(user_id, where, page_size, page_token)
        renders = await self._with_estimates(user_id, page.renders)
        if download:
            renders = await self._with_download_links(renders)
        return Page([self._derived(r) for r in renders], page.next_page_token)

    async def _with_download_links(self, renders: Sequence[Render]) -> Sequence[Render]:
        """`renders`, those with an output there with a presigned link to it (signing is local:
        no request to the store)."""
        linked: list[Render] = []
        for render in renders:
            if render.output is not None and render.output_deleted_at is None:
                signed = await self._artifacts.presigned_url(render.id)
                if signed is not None:
                    render = replace(render, download=DownloadLink(*signed))
            linked.append(render)
        return linked

    async def _with_estimates(self, user_id: str, renders: Sequence[Render]) -> Sequence[Render]:
        """`renders`, those queued (and not waiting for a chain predecessor) with `queue_position`
        and `eta_s`, those running with `remaining_s` (see `eta`)."""
        if not any(r.status in ("queued", "running") for r in renders):
            return renders
        durations = await self._durations()
        estimates: dict[str, eta.Estimate] = {}
        if any(r.status == "queued" and not r.waiting_on for r in renders):
            estimates = eta.estimate(await self._store.queue_snapshot(user_id), durations)
        now = datetime.now(UTC)
        return [
            replace(r, queue_position=e.queue_position, eta_s=e.eta_s)
            if (e := estimates.get(r.id))
            else replace(r, remaining_s=_remaining(r, durations, now))
            if r.status == "running"
            else r
            for r in renders
        ]

    async def _durations(self) -> eta.Durations:
        """The model of run times, from recent renders; read again every few seconds (at once while
        it has no history: the first renders of a new system are soon there)."""
        now = time.monotonic()
        if self._run_times is None or now - self._run_times[0] > RUN_TIMES_TTL_S or not self._run_times[1]:
            self._run_times = (now, eta.Durations(await self._store.recent_run_times()))
        return self._run_times[1]

    async def cancel(self, user_id: str, render_id: str) -> Render:
        """Cancels a queued render at once; asks the worker of a running one to stop it. A render
        cancelled or expired already is answered as it is (`replayed`)."""
        outcome = await self._store.cancel(user_id, render_id)
        return replace(await self.get(user_id, render_id), replayed=outcome == "already")

    async def cancel_batch(self, user_id: str, batch_id: str) -> Batch:
        """Cancels every queued render of the batch at once and asks the workers of its running
        ones to stop them; `replayed` when nothing was left to cancel."""
        changed = await self._store.cancel_batch(user_id, batch_id)
        return replace(await self.get_batch(user_id, batch_id), replayed=not changed)

    async def retry(self, user_id: str, render_id: str, submission: Submission) -> Render:
        """Queues a new render with the inputs of one that failed, was cancelled or expired, linked
        to it (`retry_of`): same project, chain, prompt, parameters and seed, reference, priority and
        timeout; no deadline. FailedPrecondition for a render that is running or succeeded."""
        original = await self._store.get(user_id, render_id)
        if original.status not in RETRYABLE:
            raise FailedPrecondition(
                f"render {render_id} is {original.status}: only a failed, cancelled or expired render"
                " is retried"
            )
        reference = original.reference
        spec = RenderSpec(
            project=original.project_id,
            chain_id=original.chain_id,
            kind=original.kind,
            prompt=original.prompt,
            negative_prompt=original.negative_prompt,
            params=original.params,
            reference=None if reference is None else replace(reference, outcome=None),
            priority=original.priority,
            timeout_s=original.timeout_s,
            retry_of=original.id,
            retention_s=original.retention_s or 0.0,
            webhook=original.webhook,
        )
        return await self.submit(spec, submission)

    async def delete_output(self, user_id: str, render_id: str) -> Render:
        """Deletes the output of an ended render at once (its record stays); FailedPrecondition while
        it has not ended."""
        await self._store.delete_output(user_id, render_id, self._artifacts.delete)
        return await self.get(user_id, render_id)

    async def update(self, user_id: str, render_id: str, priority: int | None) -> Render:
        """Changes the priority of a queued render (None: unchanged); FailedPrecondition once it
        has started."""
        if priority is not None:
            if not PRIORITY.minimum <= priority <= PRIORITY.maximum:
                bounds = f"{PRIORITY.minimum} and {PRIORITY.maximum}"
                raise ValidationFailed.field("priority", f"must be between {bounds}")
            await self._store.set_priority(user_id, render_id, priority)
        return await self.get(user_id, render_id)

    async def watch(self, user_id: str, render_id: str, after_seq: int) -> AsyncIterator[Event]:
        """The render's events after `after_seq`, then live ones, until its terminal event."""
        render = await self._store.get(user_id, render_id)
        if render.terminal:
            for event in await self._store.events_after(render_id, after_seq):
                yield event
            return
        async for event in follow(self._hub, self._store, {render_id: after_seq}):
            yield event

    async def get_batch(self, user_id: str, batch_id: str) -> Batch:
        """The batch with its renders and counts."""
        batch = await self._store.get_batch(user_id, batch_id)
        return replace(batch, renders=[self._derived(r) for r in batch.renders])

    async def watch_batch(
        self, user_id: str, batch_id: str, after_seqs: Sequence[int] = ()
    ) -> AsyncIterator[Event]:
        """The events of every render of the batch until all have ended, each render's after its
        cursor: `after_seqs` in the batch's render order (missing: from the first)."""
        batch = await self._store.get_batch(user_id, batch_id)
        cursors = {r.id: after_seqs[i] if i < len(after_seqs) else 0 for i, r in enumerate(batch.renders)}
        # Renders already ended only replay their log (which may have been pruned).
        ended = {r.id: cursors[r.id] for r in batch.renders if r.terminal}
        for event in await self._store.events_after_many(ended) if ended else []:
            yield event
        live = {r.id: cursors[r.id] for r in batch.renders if not r.terminal}
        async for event in follow(self._hub, self._store, live):
            yield event

    async def output(
        self, user_id: str, render_id: str, offset: int, length: int
    ) -> tuple[Output, AsyncIterator[bytes]]:
        """The output's description and its bytes (a range of them); FailedPrecondition before
        the render has succeeded."""
        render = await self._store.get(user_id, render_id)
        if render.output_deleted_at is not None:
            raise Gone(
                f"the output of render {render_id} was deleted at {render.output_deleted_at.isoformat()}"
            )
        if render.output is None:
            raise FailedPrecondition(f"render {render_id} has no output ({render.status})")
        return render.output, self._artifacts.read(render_id, offset, length)

    def _derived(self, render: Render) -> Render:
        if render.status != "running":
            return render
        since = render.last_progress_at or render.started_at
        stalled = since is not None and (datetime.now(UTC) - since).total_seconds() > self._stall_after_s
        return replace(render, stalled=stalled)


def _remaining(render: Render, durations: eta.Durations, now: datetime) -> float | None:
    """A running render's expected seconds to its end: what its progress so far says, or before it
    says much, what recent renders of its kind and size took."""
    if render.started_at is None:
        return None
    elapsed = (now - render.started_at).total_seconds()
    if render.progress >= eta.TRUSTED_PROGRESS:
        return round(elapsed * (1 - render.progress) / render.progress, 1)
    expected = durations.of(eta.Job(render.id, render.user_id, render.kind, render.params.__dict__))
    return None if expected is None else round(max(0.0, expected - elapsed), 1)


def _traced(submission: Submission) -> Submission:
    """The submission with the caller's traceparent, or the current span's when it sent none."""
    if submission.traceparent or not trace.get_current_span().get_span_context().is_valid:
        return submission
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return replace(submission, traceparent=carrier.get("traceparent", ""))


async def _db_phase(submission: Submission, lookup: Awaitable[T]) -> tuple[T, Submission]:
    """What `lookup` finds (the render's project, chain and rules: the catalog's cache, or metadata
    on a miss), timed as the render's `db` phase, and the submission with that time and its trace."""
    started = time.perf_counter()
    found = await lookup
    spent_ms = (time.perf_counter() - started) * 1000 + submission.timings.get("db_ms", 0.0)
    # An attribute of the call's span, not a span: a cache hit takes microseconds (a miss's call
    # to metadata has its own span).
    trace.get_current_span().set_attribute(phase_attribute("db"), round(spent_ms, 3))
    return found, _traced(replace(submission, timings={**submission.timings, "db_ms": round(spent_ms, 3)}))
