"""Reference images in the work path, against a stand-in imagefetch server speaking the real
contract: fetched and blended, going on without when allowed, failing with the fetch's reason
when required, read from another render (a video by its last frame); prefetched at submit; and
the job's trace linked to the submitting request."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from renderflow.v1 import generation_pb2 as pb
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.generation.artifacts import LocalArtifactStore
from shared.grpc_server import create_server, start
from tests.conftest import free_port
from tests.support.generation import (
    ServerFactory,
    Stub,
    WorkerFactory,
    events,
    finished,
    status_name,
    submit,
    user_id,
)
from tests.support.observed_stack import Recorder

OK_URL = "https://images.example/ok.png"
MISSING_URL = "https://images.example/missing.png"


class StandInImageFetch(imagefetch_pb2_grpc.ImageFetchServiceServicer):
    """Serves a blue square for OK_URL and an http_404 failure for anything else."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.asked = asyncio.Event()

    async def Fetch(self, request: imagefetch_pb2.FetchRequest, context: Any) -> imagefetch_pb2.FetchResult:
        self.requests.append(request.url)
        self.asked.set()
        if request.url != OK_URL:
            failure = imagefetch_pb2.FetchFailure(reason="http_404", message="the origin said 404")
            return imagefetch_pb2.FetchResult(url=request.url, failure=failure)
        data = io.BytesIO()
        Image.new("RGB", (32, 32), (0, 0, 255)).save(data, "PNG")
        image = imagefetch_pb2.Image(
            data=data.getvalue(),
            content_type="image/png",
            width=32,
            height=32,
            size_bytes=len(data.getvalue()),
        )
        return imagefetch_pb2.FetchResult(url=request.url, image=image)

    # The worker fetches one reference at a time (Fetch); the streaming calls are not its.
    async def FetchWithProgress(
        self, request: imagefetch_pb2.FetchRequest, context: Any
    ) -> AsyncIterator[imagefetch_pb2.FetchProgress]:
        raise NotImplementedError
        yield

    async def FetchMany(
        self, request: imagefetch_pb2.FetchManyRequest, context: Any
    ) -> AsyncIterator[imagefetch_pb2.FetchResult]:
        raise NotImplementedError
        yield

    async def Deliver(
        self, request: imagefetch_pb2.DeliverRequest, context: Any
    ) -> imagefetch_pb2.DeliverResult:
        raise NotImplementedError  # webhooks are the generation server's, not the worker's


@contextlib.asynccontextmanager
async def serving_imagefetch(address: str) -> AsyncIterator[tuple[str, StandInImageFetch]]:
    """The stand-in served at `address` (port 0: any free one); yields its address."""
    servicer = StandInImageFetch()
    handle = create_server(["renderflow.v1.ImageFetchService"], token=None)
    imagefetch_pb2_grpc.add_ImageFetchServiceServicer_to_server(servicer, handle.server)
    port = await start(handle, address)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await handle.server.stop(None)


@pytest.fixture
async def imagefetch() -> AsyncIterator[tuple[str, StandInImageFetch]]:
    async with serving_imagefetch("127.0.0.1:0") as served:
        yield served


async def test_a_fetched_reference_shapes_the_output(
    stub: Stub, start_worker: WorkerFactory, imagefetch: tuple[str, StandInImageFetch]
) -> None:
    address, servicer = imagefetch
    await start_worker(imagefetch_addr=address)
    plain = await finished(stub, (await submit(stub, seed=1)).id)
    referenced = await submit(stub, seed=1, reference=pb.Reference(url=OK_URL))

    done = await finished(stub, referenced.id)

    assert status_name(done) == "succeeded" and servicer.requests == [OK_URL]
    assert done.timings.HasField("image_fetch_ms")
    assert done.output.sha256 != plain.output.sha256
    phases = [e.phase for e in await events(stub, done.id) if e.type == "phase"]
    assert phases == ["image_fetch", "generation", "store"]


async def test_a_missing_optional_reference_is_skipped_and_said(
    stub: Stub, start_worker: WorkerFactory, imagefetch: tuple[str, StandInImageFetch]
) -> None:
    await start_worker(imagefetch_addr=imagefetch[0])
    plain = await finished(stub, (await submit(stub, seed=2)).id)
    done = await finished(stub, (await submit(stub, seed=2, reference=pb.Reference(url=MISSING_URL))).id)
    assert status_name(done) == "succeeded"
    assert done.output.sha256 == plain.output.sha256  # deterministic, and the reference left out
    notes = [e.message for e in await events(stub, done.id) if e.type == "phase" and e.message]
    assert len(notes) == 1 and "http_404" in notes[0]
    assert done.reference.HasField("used") and not done.reference.used
    assert done.reference.reason == "http_404"


async def test_a_missing_required_reference_fails_with_the_fetch_reason(
    stub: Stub, start_worker: WorkerFactory, imagefetch: tuple[str, StandInImageFetch]
) -> None:
    await start_worker(imagefetch_addr=imagefetch[0])
    reference = pb.Reference(url=MISSING_URL, required=True)
    done = await finished(stub, (await submit(stub, reference=reference)).id)
    assert status_name(done) == "failed" and done.attempts == 1
    assert (done.error.code, done.error.reason) == ("reference_fetch_failed", "http_404")
    assert (done.reference.used, done.reference.reason) == (False, "http_404")


async def test_submit_prefetches_a_reference_url_in_the_background(
    start_server: ServerFactory, imagefetch: tuple[str, StandInImageFetch]
) -> None:
    address, servicer = imagefetch
    stub = await start_server(prefetch_addr=address)
    render = await submit(stub, reference=pb.Reference(url=OK_URL))
    assert status_name(render) == "queued"  # no worker: only the prefetch can have asked
    await asyncio.wait_for(servicer.asked.wait(), 5)
    assert servicer.requests == [OK_URL]


async def test_a_prefetch_is_a_trace_of_its_own_linked_to_the_submit(
    start_server: ServerFactory, imagefetch: tuple[str, StandInImageFetch], recorder: Recorder
) -> None:
    address, servicer = imagefetch
    stub = await start_server(prefetch_addr=address)
    await submit(stub, reference=pb.Reference(url=OK_URL))
    await asyncio.wait_for(servicer.asked.wait(), 5)
    await recorder.wait_for(lambda spans: any(s.name == "reference_prefetch" for s in spans))

    [prefetch] = [s for s in recorder.spans if s.name == "reference_prefetch"]
    [link] = prefetch.links
    [submitted] = [
        s for s in recorder.spans if s.context is not None and s.context.span_id == link.context.span_id
    ]
    assert prefetch.parent is None and prefetch.context is not None
    assert submitted.name.endswith("GenerationService/Submit") and submitted.context is not None
    assert submitted.context.trace_id != prefetch.context.trace_id  # the submit's trace ends with it
    fetches = [s for s in recorder.spans if s.name.endswith("ImageFetchService/Fetch")]
    assert fetches and all(
        s.context is not None and s.context.trace_id == prefetch.context.trace_id for s in fetches
    )


async def test_a_render_waits_out_an_imagefetch_outage_without_spending_an_attempt(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    await start_worker(imagefetch_addr=address, image_fetch_outage_s=30.0)
    render = await submit(stub, reference=pb.Reference(url=OK_URL, required=True))
    call = stub.Watch(pb.WatchRequest(user_id=await user_id(stub), render_id=render.id))
    async with asyncio.timeout(10):
        async for event in call:
            if event.type == "phase" and event.phase == "image_fetch":
                break  # the worker is at the reference, which it cannot fetch
    call.cancel()
    async with serving_imagefetch(address) as (_, servicer):
        done = await finished(stub, render.id)
    assert status_name(done) == "succeeded" and done.attempts == 1
    assert servicer.requests == [OK_URL]


async def test_imagefetch_down_longer_than_the_wait_spends_attempts(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    await start_worker(imagefetch_addr="127.0.0.1:1", max_attempts=2)  # nothing listens there
    optional = await finished(stub, (await submit(stub, reference=pb.Reference(url=OK_URL))).id)
    required = await finished(
        stub, (await submit(stub, reference=pb.Reference(url=OK_URL, required=True))).id
    )
    assert status_name(optional) == "succeeded"
    assert status_name(required) == "failed" and required.attempts == 2
    assert (required.error.code, required.error.reason) == ("reference_fetch_failed", "unavailable")


async def test_another_render_as_reference_only_if_it_is_yours(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    await start_worker()
    mine = await finished(stub, (await submit(stub, prompt="a blue whale")).id)
    theirs = await finished(stub, (await submit(stub, user="bob")).id, user="bob")
    plain = await finished(stub, (await submit(stub, seed=3)).id)

    chained = await finished(stub, (await submit(stub, seed=3, reference=pb.Reference(render_id=mine.id))).id)
    stolen = await submit(stub, reference=pb.Reference(render_id=theirs.id, required=True))
    refused = await finished(stub, stolen.id)

    assert status_name(chained) == "succeeded" and chained.output.sha256 != plain.output.sha256
    assert status_name(refused) == "failed"
    assert (refused.error.code, refused.error.reason) == ("reference_fetch_failed", "not_found")


async def test_a_video_as_reference_is_its_last_frame_and_fails_typed_when_undecodable(
    stub: Stub, start_worker: WorkerFactory, artifact_dir: Path
) -> None:
    await start_worker()
    source = await submit(stub, kind=pb.RENDER_KIND_VIDEO, duration_s=1.0, fps=6)
    assert status_name(await finished(stub, source.id)) == "succeeded"

    framed = await finished(stub, (await submit(stub, reference=pb.Reference(render_id=source.id))).id)
    LocalArtifactStore(artifact_dir).path(source.id).write_bytes(b"not a video")
    broken = pb.Reference(render_id=source.id, required=True)
    refused = await finished(stub, (await submit(stub, reference=broken)).id)

    assert status_name(framed) == "succeeded"
    notes = [e.message for e in await events(stub, framed.id) if e.type == "phase" and e.message]
    assert notes == [f"reference: the last frame of {source.id}"]
    assert status_name(refused) == "failed" and refused.attempts == 1
    error = refused.error
    assert (error.code, error.reason, error.retryable) == (
        "reference_fetch_failed",
        "undecodable_video",
        False,
    )
    assert error.message == f"the last frame of render {source.id}: the video cannot be decoded"


async def test_the_job_trace_links_to_the_submitting_request(stub: Stub, start_worker: WorkerFactory) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    render_ended = _RenderEnded()
    provider.add_span_processor(render_ended)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        await start_worker()
        render = await submit(stub, traceparent=f"00-{trace_id}-{span_id}-01")
        done = await finished(stub, render.id)
        # The worker's `render` span ends a moment after the terminal event is visible.
        await asyncio.wait_for(render_ended.wait(render.id), 5)
        spans = exporter.get_finished_spans()
    finally:
        exporter.shutdown()
    assert done.trace_id == trace_id
    (root,) = [s for s in spans if s.name == "render" and (s.attributes or {}).get("render.id") == render.id]
    links = [(link.context.trace_id, link.context.span_id) for link in root.links]
    assert links == [(int(trace_id, 16), int(span_id, 16))]
    children = {s.name for s in spans if s.parent and s.parent.span_id == root.context.span_id}
    assert {"queue_wait", "generation", "store"} <= children


class _RenderEnded(SpanProcessor):
    """Tells when the `render` span of a render has ended."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ended: dict[str, asyncio.Event] = {}

    def _event(self, render_id: str) -> asyncio.Event:
        return self._ended.setdefault(render_id, asyncio.Event())

    def on_end(self, span: ReadableSpan) -> None:
        render_id = (span.attributes or {}).get("render.id")
        if span.name == "render" and isinstance(render_id, str):
            self._loop.call_soon_threadsafe(self._event(render_id).set)

    async def wait(self, render_id: str) -> None:
        await self._event(render_id).wait()
