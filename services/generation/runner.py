"""The work path of one claimed job: image_fetch → generation → store → succeeded. The claim has
already made the render `running`, with its `started` event and its first phase's (`claim_jobs`).

Each phase is a span and a duration in the render's `timings`. Every write is fenced by the
lease; when one touches nothing the job was taken away and its result is dropped. Failures are
classified: transient ones are retried after a backoff until attempts run out, permanent ones
(and a backend call past the kind's maximum duration) fail the render at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from services.generation.artifacts import ArtifactStore, StoredArtifact
from services.generation.backends import Artifact, Backend, BackendError, GenerationInput
from services.generation.domain import NewEvent, Output, ReferenceOutcome, Render, RenderError
from services.generation.instruments import Instruments
from services.generation.jobs import Claim
from services.generation.outages import waiting_out
from services.generation.pacing import BackendPacing
from services.generation.protocols import WorkerStore
from services.generation.references import ReferenceFailed, References
from shared.contract import Phase
from shared.errors import Unavailable
from shared.logs import log_slow_operation
from shared.telemetry import Budgets, record_failure

log = logging.getLogger(__name__)
tracer = trace.get_tracer("renderflow.generation.worker")

StopReason = Literal["cancel", "shutdown", "lease_lost"]
T = TypeVar("T")
_CANCELLED = RenderError("cancelled", message="cancelled at the user's request")


class LeaseLost(Exception):
    """A fenced write touched nothing: another worker has the job now, or it has ended."""


class Failure(Exception):
    """The render cannot succeed on this attempt; `transient` when a later one might."""

    def __init__(self, error: RenderError, transient: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.transient = transient


@dataclass
class Attempt:
    """What one attempt has learnt that its end records, however it ends."""

    reference: ReferenceOutcome | None = None
    provider_request_id: str = ""

    def provider_request(self, request_id: str) -> None:
        """The provider's id of the attempt's request: kept, and on the render's span."""
        if request_id:
            self.provider_request_id = request_id
            trace.get_current_span().set_attribute("render.provider_request_id", request_id)


@dataclass
class Control:
    """Why the worker cancelled a job's task (None: it did not)."""

    stop_reason: StopReason | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter between attempts."""

    base_s: float
    max_s: float

    def delay(self, attempt: int) -> float:
        backoff: float = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        return backoff * random.uniform(0.5, 1.0)


class EventWriter:
    """Fenced event writes of one job, coalesced: progress to one event per `interval_s`, and a
    phase that ends within `interval_s` reported with the next write rather than on its own. The
    last step's event and a short phase's are held, never dropped: the next write (or the job's
    end, see `held`) carries them first."""

    def __init__(self, queue: WorkerStore, claim: Claim, interval_s: float) -> None:
        self._queue = queue
        self._claim = claim
        self._interval_s = interval_s
        self._last_progress = -float("inf")
        self._held: list[NewEvent] = []

    async def write(self, events: Sequence[NewEvent], **changes: Any) -> None:
        held = self.held()
        progress = [event.progress for event in held if event.progress is not None]
        if progress:
            changes.setdefault("progress", progress[-1])
        if not await self._queue.progress(self._claim, [*held, *events], **changes):
            raise LeaseLost(self._claim.render_id)

    def held(self) -> list[NewEvent]:
        """The events held back so far (the caller writes them); none are held afterwards."""
        held, self._held = self._held, []
        return held

    async def progress(self, step: int, total: int) -> None:
        event = NewEvent("progress", progress=round(step / total, 4))
        if step >= total:
            self._held.append(event)
            return
        now = time.monotonic()
        if now - self._last_progress >= self._interval_s:
            self._last_progress = now
            await self.write([event], progress=event.progress)

    async def phase(self, event: NewEvent, work: Awaitable[T]) -> T:
        """`work`, in the phase `event` announces: written as soon as the phase has lasted
        `interval_s`, or held for the next write when it ended sooner (a watcher learns of a phase
        as late as of progress, and a short one costs no statement of its own)."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self._interval_s)
            if done:
                self._held.append(event)
            else:
                await self.write([event])
            return await task
        finally:
            task.cancel()  # only when the phase did not end: it is abandoned (lease lost, cancelled)


class JobRunner:
    """Runs claimed jobs to their end."""

    def __init__(
        self,
        queue: WorkerStore,
        backends: Mapping[str, Backend],
        artifacts: ArtifactStore,
        references: References,
        *,
        retry: RetryPolicy,
        progress_interval_s: float,
        on_retry: Callable[[float], None] = lambda delay_s: None,
        budgets: Budgets | None = None,
        instruments: Instruments | None = None,
        max_duration_s: Mapping[str, float] | None = None,
        pacing: BackendPacing | None = None,
        store_outage_s: float = 0.0,
    ) -> None:
        self._queue = queue
        self._backends = backends
        """By name: a job's claim names the one that renders it."""
        self._artifacts = artifacts
        self._references = references
        self._retry = retry
        self._progress_interval_s = progress_interval_s
        self.on_retry = on_retry
        """Called with the backoff of each retry (the worker wakes up when it is over)."""
        self._budgets = budgets or Budgets()
        self._instruments = instruments or Instruments.create()
        self._max_duration_s = max_duration_s or {}
        """The most a backend call may take, by kind."""
        self._pacing = pacing
        self._store_outage_s = store_outage_s

    async def run(self, claim: Claim, control: Control) -> None:
        """Runs the job; when the worker cancels it, records why (cancelled, handed back, dropped)."""
        extra = {"render_id": claim.render_id, "attempt": claim.attempts}
        try:
            render = claim.render
            if claim.cancel_requested or render is None:  # claimed only to be cancelled
                await self._queue.finish(claim, "cancelled", error=_CANCELLED)
                return
            deadline = asyncio.timeout(_seconds_until(render.deadline))
            try:
                async with deadline:
                    await self._attempt(claim, render)
            except TimeoutError:
                if not deadline.expired():
                    raise
                log.info("job stopped", extra={**extra, "reason": "deadline"})
                await self._queue.finish(claim, "cancelled", error=_past_deadline(render))
        except asyncio.CancelledError:
            reason = control.stop_reason
            if reason is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.info("job stopped", extra={**extra, "reason": reason})
            if reason == "cancel":
                await self._queue.finish(claim, "cancelled", error=_CANCELLED)
            elif reason == "shutdown":
                await self._queue.requeue(claim, 0.0, "handed back by a stopping worker", refund=True)
        except LeaseLost:
            log.warning("lease lost; dropping the result", extra=extra)
        except Unavailable:
            # The database is away: nothing can be recorded now. The job's lease is no longer
            # renewed, so the rescuer requeues it once it expires.
            log.exception("render interrupted; it will be retried when its lease expires", extra=extra)
        except Exception as exc:
            log.exception("render failed unexpectedly", extra=extra)
            error = RenderError("internal", type(exc).__name__, "an unexpected error stopped the render")
            await self._queue.finish(claim, "failed", error=error)

    async def _attempt(self, claim: Claim, render: Render) -> None:
        # The claim started the render (`running`, its `started` and first phase events): the
        # render's span begins when the claim did.
        attributes: dict[str, str | int] = {
            "render.id": render.id,
            "render.kind": render.kind,
            "render.attempt": claim.attempts,
            "render.project": render.project,
            "render.tenant": claim.tenant,
            "render.backend": claim.backend,
        }
        with tracer.start_as_current_span(
            "render",
            kind=SpanKind.CONSUMER,
            links=_links(render.traceparent),
            attributes=attributes,
            start_time=_ns(claim.claimed_at),
        ) as span:
            queue_wait = tracer.start_span("queue_wait", start_time=_ns(claim.created_at))
            queue_wait.end(end_time=_ns(claim.claimed_at))
            timings = {"queue_wait_ms": _ms_between(claim.created_at, claim.claimed_at)}
            self._observe("queue_wait", render, timings["queue_wait_ms"], timings)
            writer = EventWriter(self._queue, claim, self._progress_interval_s)
            attempt = Attempt()
            try:
                async with _output_dir(render.kind) as workdir:
                    await self._work(claim, render, writer, timings, attempt, workdir)
            except Failure as failure:
                _mark_failed(span, failure.error)
                await self._failed(claim, failure, timings, writer.held(), attempt)

    async def _work(
        self,
        claim: Claim,
        render: Render,
        writer: EventWriter,
        timings: dict[str, float],
        attempt: Attempt,
        workdir: Path | None,
    ) -> None:
        reference = None
        if render.reference is not None:
            with self._phase("image_fetch", render, timings):
                reference, note = await self._reference(render, attempt)
            await writer.write([NewEvent("phase", phase="generation", message=note)], timings=timings)
        backend = self._backends.get(claim.backend)
        if backend is None:
            raise Failure(RenderError("internal", "unknown_backend", f"no backend {claim.backend!r}"), False)
        with self._phase("generation", render, timings):
            if self._pacing is not None:
                await self._pacing.wait_turn(claim.backend)
            limit, reason = self._max_duration_s.get(render.kind), "max_duration"
            if render.timeout_s and (limit is None or render.timeout_s < limit):
                limit, reason = render.timeout_s, "timeout_s"
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    artifact = await backend.generate(_input(render, reference, workdir), writer.progress)
                attempt.provider_request(artifact.provider_request_id)
            except BackendError as exc:
                attempt.provider_request(exc.provider_request_id)
                error = RenderError("generation_failed", exc.reason, str(exc), retryable=exc.transient)
                raise Failure(error, exc.transient) from exc
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                if reason == "timeout_s":
                    message = f"the {render.kind} took longer than its timeout_s of {limit:g} s"
                else:
                    message = f"the {render.kind} took longer than {limit:g} s, the most one may take"
                raise Failure(RenderError("timeout", reason, message), False) from exc
        with self._phase("store", render, timings):
            try:
                stored = await writer.phase(NewEvent("phase", phase="store"), self._put(render.id, artifact))
            except OSError as exc:
                raise Failure(
                    RenderError("internal", "store_failed", str(exc), retryable=True), True
                ) from exc
        timings["total_ms"] = _ms_between(render.created_at, datetime.now(UTC))
        output = Output(
            url=f"/v1/renders/{render.id}/output",
            content_type=artifact.content_type,
            bytes=stored.size,
            width=artifact.width,
            height=artifact.height,
            sha256=stored.sha256,
            duration_s=artifact.duration_s,
        )
        succeeded = await self._queue.finish(
            claim,
            "succeeded",
            output=output,
            timings=timings,
            before=writer.held(),
            reference=attempt.reference,
            provider_request_id=attempt.provider_request_id,
        )
        if not succeeded:
            raise LeaseLost(claim.render_id)

    async def _put(self, render_id: str, artifact: Artifact) -> StoredArtifact:
        """The output stored. An object store that is down is waited for (up to `store_outage_s`,
        as for the image fetcher: an outage of our own plumbing should not spend the attempts of a
        user's render); past that, and for a disk that fails, OSError: a failed attempt."""

        try:
            async for attempt in waiting_out(self._store_outage_s, "artifact store", render_id=render_id):
                with attempt:
                    stored = await self._artifacts.put(render_id, artifact.content, artifact.content_type)
        except Unavailable as exc:  # the store's, not the database's: it costs this attempt only
            raise OSError(f"the artifact store is unavailable: {exc}") from exc
        return stored

    async def _reference(self, render: Render, attempt: Attempt) -> tuple[bytes | None, str]:
        """The reference bytes, or None and why the render goes on without them; what became of
        the reference in `attempt`."""
        reference = render.reference
        assert reference is not None
        try:
            resolved = await self._references.resolve(render)
        except ReferenceFailed as exc:
            error = RenderError("reference_fetch_failed", exc.reason, str(exc), retryable=exc.retryable)
            attempt.reference = ReferenceOutcome(False, exc.reason, str(exc), exc.source_render_id)
            log.warning(
                "reference failed; the render fails" if reference.required else "reference not used",
                extra={
                    "render_id": render.id,
                    "host": URL(reference.url).host if reference.url else None,
                    "source_render_id": exc.source_render_id or None,
                    "reason": exc.reason,
                    "error": str(exc),
                },
            )
            if not reference.required:
                _mark_failed(trace.get_current_span(), error)  # the image_fetch phase failed, not the render
                return None, f"going on without the reference: {exc.reason} ({exc})"
            raise Failure(error, exc.transient) from exc
        attempt.reference = ReferenceOutcome(True, source_render_id=resolved.source_render_id)
        return resolved.data, resolved.note

    async def _failed(
        self,
        claim: Claim,
        failure: Failure,
        timings: dict[str, float],
        held: Sequence[NewEvent],
        attempt: Attempt,
    ) -> None:
        error = failure.error
        if failure.transient and claim.attempts < claim.max_attempts:
            delay = self._retry.delay(claim.attempts)
            message = (
                f"attempt {claim.attempts} failed ({error.reason}: {error.message}); retry in {delay:.1f} s"
            )
            if not await self._queue.requeue(claim, delay, message):
                raise LeaseLost(claim.render_id)
            self._instruments.retries.add(
                1, {"error.code": error.code, "error.reason": error.reason, "render.kind": claim.kind}
            )
            self.on_retry(delay)
            return
        if failure.transient:
            error = RenderError(
                error.code,
                error.reason,
                f"{error.message} (after {claim.attempts} attempts)",
                error.retryable,
            )
        finished = await self._queue.finish(
            claim,
            "failed",
            error=error,
            timings=timings,
            before=held,
            reference=attempt.reference,
            provider_request_id=attempt.provider_request_id,
        )
        if not finished:
            raise LeaseLost(claim.render_id)

    @contextmanager
    def _phase(self, name: Phase, render: Render, timings: dict[str, float]) -> Iterator[None]:
        """A span for the phase, marked with why it failed if it did; its duration in `timings` (kept
        even when the phase fails), in the phase histogram, and in a warning when over budget."""
        started = time.perf_counter()
        try:
            with tracer.start_as_current_span(
                name, record_exception=False, set_status_on_exception=False
            ) as span:
                try:
                    yield
                except Failure as failure:
                    _mark_failed(span, failure.error)
                    raise
                except Exception as exc:
                    record_failure(span, exc)
                    raise
        finally:
            timings[f"{name}_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self._observe(name, render, timings[f"{name}_ms"], timings)

    def _observe(self, phase: Phase, render: Render, elapsed_ms: float, timings: dict[str, float]) -> None:
        self._instruments.phase_duration.record(
            elapsed_ms / 1000, {"phase": phase, "render.kind": render.kind}
        )
        budget = self._budgets.of(phase)
        if budget is not None and elapsed_ms > budget:
            # What an SRE acts on: the render, and for a reference the host it came from (never the
            # URL: it may carry credentials), for the generation the render's size and worker's host.
            reference = render.reference
            url_host = (
                URL(reference.url).host if phase == "image_fetch" and reference and reference.url else None
            )
            log_slow_operation(
                log,
                phase,
                elapsed_ms,
                budget,
                timings,
                render_id=render.id,
                reference_host=url_host,
                kind=render.kind,
                worker_host=_HOST,
            )


_HOST = socket.gethostname()


def _mark_failed(span: Span, error: RenderError) -> None:
    """The span failed, and why: `error.code` (reference_fetch_failed, ...) and `failure.reason`."""
    span.set_attributes({"error.code": error.code, "failure.reason": error.reason})
    span.set_status(Status(StatusCode.ERROR, f"{error.code}: {error.reason}"))


def _input(render: Render, reference: bytes | None, workdir: Path | None) -> GenerationInput:
    params = render.params
    return GenerationInput(
        render_id=render.id,
        kind=render.kind,
        prompt=render.prompt,
        negative_prompt=render.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        seed=params.seed,
        rules=tuple(rule.text for rule in render.rules),
        reference=reference,
        duration_s=params.duration_s,
        fps=params.fps,
        deadline=render.deadline,
        workflow=params.workflow,
        workdir=workdir,
    )


@asynccontextmanager
async def _output_dir(kind: str) -> AsyncIterator[Path | None]:
    """For a video, a directory of the attempt's own where its output is written as a file (stored
    from there in parts, never held whole), removed afterwards however the attempt ends."""
    if kind != "video":
        yield None
        return
    path = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="renderflow-output-"))
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


def _links(traceparent: str) -> list[Link]:
    """A link to the submitting request's span, so the job's trace leads back to it."""
    if not traceparent:
        return []
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


def _seconds_until(moment: datetime | None) -> float | None:
    return None if moment is None else (moment - datetime.now(UTC)).total_seconds()


def _past_deadline(render: Render) -> RenderError:
    assert render.deadline is not None
    at = render.deadline.isoformat(timespec="milliseconds")
    return RenderError("cancelled", "deadline", f"still running at its deadline ({at})")


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


def _ms_between(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 3)
