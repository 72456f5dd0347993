"""The worker process: claims jobs, runs up to `concurrency` at once, keeps their leases alive,
rescues jobs of dead workers, and on SIGTERM drains then hands back what is left.

Entry point of `python -m services.generation.worker` (and `renderflow worker`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial

from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.generation.artifacts import ArtifactStore
from services.generation.backends import Backend
from services.generation.backends.selection import open_backends
from services.generation.background import background
from services.generation.config import WorkerSettings, artifact_store
from services.generation.instruments import count_finished
from services.generation.jobs import Claim, JobPolicy
from services.generation.listener import Listener
from services.generation.pacing import BackendPacing
from services.generation.protocols import WorkerStore
from services.generation.references import References
from services.generation.runner import Control, JobRunner, RetryPolicy, StopReason
from services.generation.store import Store, database_url
from shared.grpc_client import create_channel
from shared.lifecycle import run_process
from shared.settings import Env

# Named, not __name__: under `python -m` this module is __main__.
log = logging.getLogger("services.generation.worker")


@dataclass
class RunningJob:
    """A job this process runs, and the means to stop it."""

    claim: Claim
    control: Control
    task: asyncio.Task[None]

    def stop(self, reason: StopReason) -> None:
        if self.control.stop_reason is None and not self.task.done():
            self.control.stop_reason = reason
            self.task.cancel()


class Worker:
    """The claim loop and the housekeeping loops of one worker process."""

    def __init__(self, settings: WorkerSettings, queue: WorkerStore, runner: JobRunner) -> None:
        self._settings = settings
        self._queue = queue
        self._runner = runner
        self._active: dict[str, RunningJob] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Looks at the queue now rather than at the next poll."""
        self._wake.set()

    def wake_later(self, delay_s: float) -> None:
        """Looks at the queue after `delay_s` (when a job put back with a backoff becomes runnable)."""
        asyncio.get_running_loop().call_later(delay_s, self._wake.set)

    def on_notify(self, channel: str, payload: str) -> None:
        """A NOTIFY: new work (`generation_jobs`) or a cancel request (`generation_cancel`)."""
        if channel == "generation_cancel":
            job = self._active.get(payload)
            if job is not None:
                job.stop("cancel")
        else:
            self.wake()

    async def claim_loop(self) -> None:
        """Claims jobs while there are free slots, until `stop_claiming`."""
        backoff = 0.1
        while not self._stopping:
            self._wake.clear()
            free = self._settings.concurrency - len(self._active)
            if free > 0:
                try:
                    with suppress_instrumentation():  # polls are not worth a trace each
                        claims = await self._queue.claim(self._settings.worker_id, free)
                except Exception:
                    log.exception("cannot claim jobs; retrying")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._settings.poll_interval_s)
                    continue
                backoff = 0.1
                for claim in claims:
                    self._start(claim)
                if len(claims) == free:
                    continue  # the queue may hold more: look again once a slot frees
            with suppress(TimeoutError):
                # asyncio.timeout, not wait_for, which on Python 3.11 can swallow a cancel.
                async with asyncio.timeout(self._settings.poll_interval_s):
                    await self._wake.wait()

    def _start(self, claim: Claim) -> None:
        control = Control()
        task = asyncio.create_task(self._runner.run(claim, control), name=f"render-{claim.render_id}")
        self._active[claim.render_id] = RunningJob(claim, control, task)
        task.add_done_callback(partial(self._finished, claim.render_id))

    def _finished(self, render_id: str, task: asyncio.Task[None]) -> None:
        self._active.pop(render_id, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            # The job could not even record its end (database gone?): its lease will expire
            # and the rescuer will requeue it.
            log.error("job ended abnormally", exc_info=task.exception(), extra={"render_id": render_id})

    async def heartbeat_loop(self) -> None:
        """Renews the leases of running jobs; stops those taken away or asked to cancel. Says the
        worker's slots are alive, too (the claim shares them out)."""
        while True:
            await asyncio.sleep(self._settings.heartbeat_s)
            jobs = list(self._active.values())
            try:
                with suppress_instrumentation():
                    await self._queue.worker_seen(self._settings.worker_id, self._settings.concurrency)
                    held = await self._queue.heartbeat([job.claim for job in jobs])
            except Exception:
                log.exception("heartbeat failed; leases may expire")
                continue
            for job in jobs:
                cancel_requested = held.get(job.claim.render_id)
                if cancel_requested is None:
                    job.stop("lease_lost")
                elif cancel_requested:
                    job.stop("cancel")

    async def rescue_loop(self) -> None:
        """Requeues jobs whose lease expired (their worker died), a little apart from other workers."""
        while True:
            await asyncio.sleep(self._settings.rescue_interval_s * random.uniform(0.8, 1.2))
            try:
                with suppress_instrumentation():
                    rescued = await self._queue.rescue()
            except Exception:
                log.exception("rescue failed")
                continue
            if rescued.requeued or rescued.failed or rescued.cancelled:
                log.warning("rescued expired jobs", extra=rescued.__dict__)

    def stop_claiming(self) -> None:
        self._stopping = True
        self._wake.set()

    async def drain(self, grace_s: float) -> None:
        """Stops claiming, lets running jobs finish for up to `grace_s`, then hands the rest back."""
        self.stop_claiming()
        tasks = [job.task for job in self._active.values()]
        if tasks:
            log.info("draining", extra={"running": len(tasks), "grace_s": grace_s})
            await asyncio.wait(tasks, timeout=grace_s)
        left = list(self._active.values())
        for job in left:
            job.stop("shutdown")
        await asyncio.gather(*(job.task for job in left), return_exceptions=True)


@asynccontextmanager
async def running_worker(
    settings: WorkerSettings,
    *,
    backends: Mapping[str, Backend] | None = None,
    artifacts: ArtifactStore | None = None,
) -> AsyncIterator[Worker]:
    """A started worker (migrations applied, LISTEN and loops running); on exit it drains for
    `settings.shutdown_grace_s`, hands back what is left, and closes everything."""
    async with AsyncExitStack() as stack:
        policy = JobPolicy(
            lease_s=settings.lease_s,
            max_attempts=settings.max_attempts,
            tenant_max_running=settings.tenant_max_running,
            reserved_slots=settings.tenant_reserved_slots,
            chain_wait_s=settings.chain_wait_s,
            event_retention_s=settings.event_retention_s,
            backends=settings.backend.by_kind(),
            projects=settings.backend.projects,
        )
        store = await stack.enter_async_context(
            Store.opened(
                settings.database_url,
                name="generation-worker",
                max_size=settings.concurrency + 4,
                policy=policy,
                on_ended=count_finished,
            )
        )
        channel = create_channel(settings.imagefetch_addr, token=settings.service_token)
        stack.push_async_callback(channel.close)
        if artifacts is None:
            artifacts = artifact_store(settings.artifact_dir, settings.artifact_s3)
            stack.push_async_callback(artifacts.close)
        if backends is None:
            backends = await stack.enter_async_context(
                open_backends(settings.backend, settings.procedural_step_ms)
            )
        references = References(
            channel, store, artifacts, settings.image_fetch_timeout_s, settings.image_fetch_outage_s
        )
        retry = RetryPolicy(settings.retry_base_s, settings.retry_max_s)
        runner = JobRunner(
            store,
            backends,
            artifacts,
            references,
            retry=retry,
            progress_interval_s=settings.progress_interval_s,
            budgets=settings.budgets,
            max_duration_s={"image": settings.max_duration_image_s, "video": settings.max_duration_video_s},
            pacing=BackendPacing(store, settings.backend_rate_limits),
            store_outage_s=settings.store_outage_s,
        )
        worker = Worker(settings, store, runner)
        runner.on_retry = worker.wake_later
        await store.worker_seen(settings.worker_id, settings.concurrency)
        stack.push_async_callback(_gone, store, settings.worker_id)
        for loop, name in ((worker.heartbeat_loop(), "heartbeat"), (worker.rescue_loop(), "rescue")):
            await stack.enter_async_context(background(loop, f"worker-{name}"))
        if not settings.db_poll_only:
            channels = ["generation_jobs", "generation_cancel"]
            listener = Listener(database_url(settings.database_url), channels, worker.on_notify, worker.wake)
            await stack.enter_async_context(background(listener.run(), "worker-listen"))
        await stack.enter_async_context(background(worker.claim_loop(), "worker-claim"))
        stack.push_async_callback(worker.drain, settings.shutdown_grace_s)
        log.info(
            "worker started", extra={"worker_id": settings.worker_id, "concurrency": settings.concurrency}
        )
        yield worker


async def _gone(store: Store, worker_id: str) -> None:
    """After the drain: the worker's slots stop counting at once (else at its row's expiry)."""
    try:
        await store.worker_gone(worker_id)
    except Exception:  # the database is gone: the row expires after a lease
        log.warning("cannot remove the worker's row", exc_info=True)


def main() -> None:
    """The worker process's entry point."""
    env = Env()
    settings = WorkerSettings.from_env(env)
    run_process(
        "generation-worker",
        env,
        lambda: running_worker(settings),
        log_level=env.str("RENDERFLOW_LOG_LEVEL", "INFO"),
    )


if __name__ == "__main__":
    main()
