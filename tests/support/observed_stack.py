"""A stack whose spans are recorded, for the observability tests: the process-wide tracer and
meter providers with a recorder, and gateway, metadata, imagefetch, generation and a worker in this
process with an origin for reference images."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from gateway.app import running as gateway_running
from gateway.config import Settings as GatewaySettings
from services.generation.backends import Backend
from services.generation.config import Settings as GenerationSettings
from services.generation.config import WorkerSettings
from services.generation.server import running as generation_running
from services.generation.worker import running_worker
from services.imagefetch.config import Settings as ImageFetchSettings
from services.imagefetch.server import running as imagefetch_running
from services.metadata import admin
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.contract import PHASE_BUDGETS_MS
from shared.logs import JsonFormatter
from shared.metrics import build_meter_provider
from shared.settings import Addresses
from shared.telemetry import Budgets
from shared.url_guard import parse_allow_list
from tests.support.origin import Origin

TINY_MS = 0.001
"""A budget every phase exceeds: slow-operation warnings on every submit and every render."""
WATCHED_LOGGERS = ("gateway.timing", "services.generation.runner", "services.imagefetch.service")


class Recorder(SpanProcessor):
    """Keeps the spans that end while recording (the tests' window onto the global provider)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.recording = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            self.spans.append(span)

    async def wait_for(self, done: Callable[[list[ReadableSpan]], bool], timeout_s: float = 20.0) -> None:
        """Waits, bounded, until `done` holds over the spans recorded so far."""

        async def poll() -> None:
            while not done(self.spans):  # noqa: ASYNC110 (spans end in other tasks; nothing to await)
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout_s)


_RECORDER = Recorder()
_installed = False


def install_global_providers() -> Recorder:
    """The process-wide tracer and meter providers (set once per process: they cannot be replaced),
    with the recorder on the tracer provider; another test module may have set a provider already."""
    global _installed
    if not _installed:
        resource = Resource.create({"service.name": "renderflow-tests"})
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(TracerProvider(resource=resource))
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(_RECORDER)
        if not isinstance(metrics.get_meter_provider(), MeterProvider):
            metrics.set_meter_provider(build_meter_provider(resource))
        _installed = True
    return _RECORDER


@contextmanager
def recording() -> Iterator[Recorder]:
    """Spans of everything this process does meanwhile, down to SQL."""
    recorder = install_global_providers()  # the pools' cursors trace each statement (shared.statements)
    recorder.recording = True
    try:
        yield recorder
    finally:
        recorder.recording = False
        recorder.spans.clear()


@dataclass
class ObservedStack:
    """Gateway, metadata, imagefetch, generation and a worker, with an origin for reference images."""

    base: str
    http: aiohttp.ClientSession
    headers: dict[str, str]
    origin: Origin
    recorder: Recorder
    logs: io.StringIO
    """What the watched loggers (slow operations, reference failures) wrote, as JSON lines."""

    async def submit(self, **fields: Any) -> tuple[int, dict[str, Any]]:
        request = {"project": "obs", "kind": "image", "params": {"width": 64, "height": 64, "steps": 2}}
        async with self.http.post(
            f"{self.base}/v1/renders", headers=self.headers, json=request | fields
        ) as r:
            return r.status, await r.json()

    async def finished(self, *render_ids: str) -> None:
        """Waits until the worker's span of each render has ended (the render has its end)."""
        wanted = set(render_ids)
        await self.recorder.wait_for(lambda spans: wanted <= {job_id(s) for s in spans if s.name == "render"})

    def slow_operations(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs.getvalue().splitlines()]
        return [line for line in lines if line["message"] == "slow operation"]


def job_id(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("render.id")


@asynccontextmanager
async def observed_stack(
    database_url: str, work_dir: Path, recorder: Recorder, worker_backends: Mapping[str, Backend] | None
) -> AsyncIterator[ObservedStack]:
    """Gateway, metadata, imagefetch, generation and a worker in this process; every phase over a
    tiny budget (so slow-operation warnings come), the `sre` user with project `obs`."""
    artifacts = work_dir / "artifacts"
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter("tests"))
    async with AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin())
        metadata = await stack.enter_async_context(
            metadata_running(MetadataSettings(listen="127.0.0.1:0", database_url=database_url))
        )
        imagefetch = await stack.enter_async_context(
            imagefetch_running(
                ImageFetchSettings(
                    listen="127.0.0.1:0", allow=parse_allow_list(["127.0.0.1"]), backoff_initial_s=0.01
                )
            )
        )
        generation = await stack.enter_async_context(
            generation_running(
                GenerationSettings(
                    listen="127.0.0.1:0",
                    database_url=database_url,
                    artifact_dir=artifacts,
                    metadata_addr=f"127.0.0.1:{metadata}",
                    queue_metrics_s=0.05,
                )
            )
        )
        worker = WorkerSettings(
            database_url=database_url,
            artifact_dir=artifacts,
            imagefetch_addr=f"127.0.0.1:{imagefetch}",
            worker_id="observed",
            poll_interval_s=0.2,
            shutdown_grace_s=0.2,
            progress_interval_s=0.05,
            retry_base_s=0.01,
            retry_max_s=0.02,
            budgets=Budgets({**PHASE_BUDGETS_MS, "store": TINY_MS}),
        )
        await stack.enter_async_context(running_worker(worker, backends=worker_backends))
        gateway = GatewaySettings(
            port=0,
            addresses=Addresses(
                metadata=f"127.0.0.1:{metadata}",
                generation=f"127.0.0.1:{generation}",
                imagefetch=f"127.0.0.1:{imagefetch}",
            ),
            budgets=Budgets({**PHASE_BUDGETS_MS, "enqueue": TINY_MS}),
        )
        port = await stack.enter_async_context(gateway_running(gateway))
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)))
        _, key = await admin.create_user(database_url, "sre")
        headers = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}"
        async with http.post(
            f"{base}/v1/projects", headers=headers, json={"slug": "obs", "name": "Obs"}
        ) as r:
            assert r.status == 201
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(handler)
            stack.callback(logging.getLogger(name).removeHandler, handler)
        recorder.spans.clear()
        yield ObservedStack(base, http, headers, origin, recorder, logs)
