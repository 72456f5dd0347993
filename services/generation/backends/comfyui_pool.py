"""Several ComfyUI instances as one pool: each runs as many prompts at once as it has slots (ComfyUI
itself executes one prompt at a time, so one slot unless the operator knows better), a render takes
the least busy instance that is up, and an instance that fails is left out until its health check
answers again.

Health: every `health_s`, each instance's `GET /queue` (cheap, and it says how deep the
instance's own queue is). An instance is down from its first failed request (a render's or the
check's) until a check succeeds. Metrics, per instance (`comfyui.instance`: its base URL):
`renderflow.comfyui.instance.up` (1/0), `renderflow.comfyui.instance.busy` (slots in use),
`renderflow.comfyui.instance.queue_depth` (prompts running or pending at the instance, as its
last check saw) and the counter `renderflow.comfyui.failovers` (renders moved off a failed
instance, by reason).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from yarl import URL

from services.generation.backends import BackendError, TransientBackendError
from services.generation.backends.provider import ProviderClient
from services.generation.background import periodically
from shared.metrics import SCOPE

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Instance:
    """One ComfyUI server and what the pool knows of it."""

    client: ProviderClient
    """Requests to it, retried as the backend's settings say."""
    slots: int
    busy: int = 0
    up: bool = True
    queue_depth: int = 0
    last_error: str = ""

    @property
    def url(self) -> URL:
        return self.client.base

    @property
    def label(self) -> str:
        """The instance in logs and metrics: its base URL (never holds credentials)."""
        return str(self.url)


class Pool:
    """The instances, shared out (see the module docstring)."""

    def __init__(
        self,
        instances: Sequence[Instance],
        *,
        health_s: float,
        unavailable_wait_s: float,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.instances = list(instances)
        self._health_s = health_s
        self._unavailable_wait_s = unavailable_wait_s
        self._changed = asyncio.Condition()
        meter = metrics.get_meter(f"{SCOPE}.comfyui", meter_provider=meter_provider)
        self.failovers = meter.create_counter(
            "renderflow.comfyui.failovers",
            unit="{render}",
            description="Renders moved off a ComfyUI instance that failed, by instance and reason",
        )
        for name, unit, description, read in (
            ("up", "1", "Whether the ComfyUI instance answers (1) or is left out (0)", lambda i: int(i.up)),
            ("busy", "{slot}", "Slots of the ComfyUI instance running a render", lambda i: i.busy),
            (
                "queue_depth",
                "{prompt}",
                "Prompts running or pending at the ComfyUI instance, as its last check saw",
                lambda i: i.queue_depth,
            ),
        ):
            meter.create_observable_gauge(
                f"renderflow.comfyui.instance.{name}",
                callbacks=[self._observe(read)],
                unit=unit,
                description=description,
            )

    def _observe(self, read: Callable[[Instance], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(i), {"comfyui.instance": i.label}) for i in self.instances]

        return callback

    @asynccontextmanager
    async def instance(self, exclude: set[Instance]) -> AsyncIterator[Instance]:
        """A slot of the least busy instance that is up and not in `exclude`, held until exit;
        waits for one to free up. With none up (beyond `exclude`), waits up to
        `unavailable_wait_s` for one to come back, then TransientBackendError."""
        chosen = await self._take(exclude)
        try:
            yield chosen
        finally:
            async with self._changed:
                chosen.busy -= 1
                self._changed.notify_all()

    async def _take(self, exclude: set[Instance]) -> Instance:
        loop = asyncio.get_running_loop()
        none_up_since: float | None = None
        async with self._changed:
            while True:
                candidates = [i for i in self.instances if i.up and i not in exclude]
                room = [i for i in candidates if i.busy < i.slots]
                if room:
                    chosen = min(room, key=lambda i: (i.busy / i.slots, i.queue_depth))
                    chosen.busy += 1
                    return chosen
                if candidates:  # all busy: one frees up in time
                    none_up_since = None
                    await self._changed.wait()
                    continue
                if not exclude.issuperset(self.instances):
                    none_up_since = none_up_since or loop.time()
                    try:
                        async with asyncio.timeout_at(none_up_since + self._unavailable_wait_s):
                            await self._changed.wait()
                        continue
                    except TimeoutError:
                        pass
                down = "; ".join(f"{i.label}: {i.last_error or 'down'}" for i in self.instances if not i.up)
                raise TransientBackendError(
                    f"no ComfyUI instance is available ({down or 'every one was tried'})", "no_instance"
                )

    async def mark_down(self, instance: Instance, reason: str, message: str) -> None:
        """Leaves `instance` out until its health check answers again."""
        if instance.up:
            extra = {"instance": instance.label, "reason": reason, "error": message}
            log.warning("ComfyUI instance down", extra=extra)
        instance.up, instance.last_error = False, message
        async with self._changed:
            self._changed.notify_all()

    async def watch(self) -> None:
        """Checks every instance about every `health_s`, for ever (cancel to stop)."""

        async def check_all() -> None:
            await asyncio.gather(*(self.check(instance) for instance in self.instances))

        await periodically(check_all, self._health_s, "ComfyUI health check", lambda _: None)

    async def check(self, instance: Instance) -> None:
        """One health check: up, with its queue depth, if `GET /queue` answers."""
        try:
            queue = await instance.client.call("health check", "GET", instance.url / "queue")
        except BackendError as exc:
            await self.mark_down(instance, exc.reason, str(exc))
            return
        instance.queue_depth = sum(
            len(queue.get(key) or []) for key in ("queue_running", "queue_pending") if isinstance(queue, dict)
        )
        if not instance.up:
            log.info("ComfyUI instance up", extra={"instance": instance.label})
            instance.up, instance.last_error = True, ""
            async with self._changed:
                self._changed.notify_all()
