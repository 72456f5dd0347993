"""ImageFetchService over gRPC: the three RPCs, deadlines from the caller, request validation, and
the spans and metrics a fetch leaves behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.imagefetch.config import Settings
from services.imagefetch.server import running
from shared.errors import ValidationFailed
from shared.grpc_client import create_channel
from shared.rpc_errors import rpc_errors
from shared.url_guard import parse_allow_list
from tests.support import eventually
from tests.support.origin import Origin
from tests.support.recorded import Recorded

if TYPE_CHECKING:
    from renderflow.v1.imagefetch_pb2_grpc import ImageFetchServiceAsyncStub as Stub

SETTINGS = Settings(
    listen="127.0.0.1:0",
    allow=parse_allow_list(["127.0.0.1"]),
    deadline_s=2.0,
    backoff_initial_s=0.05,
    backoff_max_s=0.1,
    drain_grace_s=0.5,
)


@pytest.fixture
def recorded() -> Recorded:
    return Recorded.create()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as origin:
        yield origin


@pytest.fixture
async def stub(recorded: Recorded) -> AsyncIterator[Stub]:
    async with (
        running(SETTINGS, recorded.instruments) as port,
        create_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield imagefetch_pb2_grpc.ImageFetchServiceStub(channel)


async def test_fetch_returns_the_image_and_then_hits_the_cache(stub: Stub, origin: Origin) -> None:
    url = origin.url("/redirect/1/rpc")
    first = await stub.Fetch(imagefetch_pb2.FetchRequest(url=url))
    assert first.WhichOneof("outcome") == "image"
    image = first.image
    assert image.data == origin.image
    assert (image.content_type, image.width, image.height) == ("image/png", 8, 6)
    assert image.size_bytes == len(origin.image)
    assert image.final_url == origin.url("/redirect/0/rpc")
    assert (first.url, first.cache_hit, first.attempts) == (url, False, 1)
    second = await stub.Fetch(imagefetch_pb2.FetchRequest(url=url))
    assert second.cache_hit and second.image.data == origin.image


async def test_a_failed_fetch_is_a_typed_result_not_an_rpc_error(stub: Stub, origin: Origin) -> None:
    result = await stub.Fetch(imagefetch_pb2.FetchRequest(url=origin.url("/status/404")))
    assert result.WhichOneof("outcome") == "failure"
    assert (result.failure.reason, result.failure.retryable) == ("http_404", False)
    assert result.failure.message


async def test_the_callers_grpc_deadline_wins_when_shorter(stub: Stub, origin: Origin) -> None:
    started = time.monotonic()
    request = imagefetch_pb2.FetchRequest(url=origin.url("/hang-headers"), deadline_ms=10_000)
    result = await stub.Fetch(request, timeout=0.6)
    assert time.monotonic() - started < 0.6
    assert result.failure.reason == "timeout" and result.failure.retryable


async def test_the_request_deadline_bounds_the_fetch(stub: Stub, origin: Origin) -> None:
    started = time.monotonic()
    request = imagefetch_pb2.FetchRequest(url=origin.url("/drip"), deadline_ms=400)
    result = await stub.Fetch(request, timeout=5)
    assert 0.4 <= time.monotonic() - started < 0.7
    assert result.failure.reason == "timeout"


async def test_progress_is_reported_before_the_image(stub: Stub, origin: Origin) -> None:
    request = imagefetch_pb2.FetchRequest(url=origin.url("/image/progress?big=1"))
    updates = [update async for update in stub.FetchWithProgress(request)]
    received = [u.received for u in updates[:-1]]
    assert received and all(u.WhichOneof("update") == "received" for u in updates[:-1])
    assert [r.bytes for r in received] == sorted(r.bytes for r in received)
    assert received[-1].bytes == len(origin.big_image)
    assert {(r.total_bytes, r.attempt) for r in received} == {(len(origin.big_image), 1)}
    assert updates[-1].WhichOneof("update") == "result"
    assert updates[-1].result.image.data == origin.big_image


async def test_fetch_many_streams_results_as_they_complete(stub: Stub, origin: Origin) -> None:
    urls = [origin.url("/gated/many"), origin.url("/image/many"), origin.url("/status/404"), "ftp://x/y"]
    request = imagefetch_pb2.FetchManyRequest(requests=[imagefetch_pb2.FetchRequest(url=u) for u in urls])
    results = []
    async for result in stub.FetchMany(request):
        results.append(result)
        if len(results) == 3:
            origin.gate.set()  # the slow one only finishes once the others have arrived
    assert [r.index for r in results][-1] == 0
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    by_index = {r.index: r for r in results}
    assert all(by_index[i].url == url for i, url in enumerate(urls))
    assert by_index[0].image.data == by_index[1].image.data == origin.image
    assert by_index[2].failure.reason == "http_404"
    assert by_index[3].failure.reason == "invalid_url"


async def test_fetch_many_is_bounded_by_the_requested_concurrency(stub: Stub, origin: Origin) -> None:
    urls = [origin.url(f"/gated/bounded-{i}") for i in range(5)]
    request = imagefetch_pb2.FetchManyRequest(
        requests=[imagefetch_pb2.FetchRequest(url=u) for u in urls], concurrency=2
    )
    call = stub.FetchMany(request)
    collected = asyncio.create_task(_collect(call))
    await eventually(lambda: origin.active == 2)
    assert origin.requests == 2
    origin.gate.set()
    results = await collected
    assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
    assert origin.max_active == 2


async def _collect(call: Any) -> list[imagefetch_pb2.FetchResult]:
    return [result async for result in call]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            imagefetch_pb2.FetchManyRequest(requests=[imagefetch_pb2.FetchRequest(url="http://x/")] * 65),
            "requests",
        ),
        (imagefetch_pb2.FetchManyRequest(concurrency=-1), "concurrency"),
        (
            imagefetch_pb2.FetchManyRequest(
                requests=[
                    imagefetch_pb2.FetchRequest(url="http://x/"),
                    imagefetch_pb2.FetchRequest(deadline_ms=-5),
                ]
            ),
            "requests[1].deadline_ms",
        ),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    stub: Stub, request_: imagefetch_pb2.FetchManyRequest, field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught, rpc_errors():
        _ = [result async for result in stub.FetchMany(request_)]
    assert [e.field for e in caught.value.errors] == [field]


async def test_spans_and_metrics_tell_the_story(stub: Stub, origin: Origin, recorded: Recorded) -> None:
    url = origin.url("/flaky/traced")
    assert (await stub.Fetch(imagefetch_pb2.FetchRequest(url=url))).attempts == 2
    assert (await stub.Fetch(imagefetch_pb2.FetchRequest(url=url))).cache_hit
    await stub.Fetch(imagefetch_pb2.FetchRequest(url=origin.url("/html-as-png")))

    spans = recorded.spans.get_finished_spans()
    fetches = [s for s in spans if s.name == "imagefetch.fetch"]
    first = fetches[0]
    assert first.attributes is not None
    assert (first.attributes["imagefetch.cache_hit"], first.attributes["imagefetch.attempts"]) == (False, 2)
    assert first.attributes["server.address"] == "127.0.0.1"
    attempts = [
        s
        for s in spans
        if s.name == "imagefetch.attempt"
        and s.parent is not None
        and s.parent.span_id == first.context.span_id
    ]
    assert sorted(str((s.attributes or {})["attempt"]) for s in attempts) == ["1", "2"]
    assert fetches[1].attributes is not None and fetches[1].attributes["imagefetch.cache_hit"] is True
    assert (
        fetches[2].attributes is not None
        and fetches[2].attributes["imagefetch.failure_reason"] == "not_an_image"
    )

    assert recorded.points("imagefetch.cache.hits") == 1
    assert recorded.points("imagefetch.cache.misses") == 2
    assert recorded.points("imagefetch.attempts") == 3
    assert recorded.points("imagefetch.failures", reason="not_an_image") == 1
    assert recorded.points("imagefetch.origin.duration", outcome="http_500") == 1
    assert recorded.points("imagefetch.origin.duration", outcome="ok") == 2


async def test_a_refused_name_tells_the_caller_nothing_of_what_it_resolved_to(
    origin: Origin, recorded: Recorded
) -> None:
    async with (
        running(replace(SETTINGS, allow=()), recorded.instruments) as port,
        create_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub: Stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        local = await stub.Fetch(imagefetch_pb2.FetchRequest(url=f"http://localhost:{origin.port}/image/a"))
        missing = await stub.Fetch(imagefetch_pb2.FetchRequest(url="http://nonexistent.invalid/image/a"))
        literal = await stub.Fetch(imagefetch_pb2.FetchRequest(url=origin.url("/image/a")))

    def seen(result: imagefetch_pb2.FetchResult, host: str) -> tuple[str, str, bool]:
        failure = result.failure
        return failure.reason, failure.message.replace(host, "<host>"), failure.retryable

    assert seen(local, "localhost") == seen(missing, "nonexistent.invalid")
    assert seen(local, "localhost") == (
        "blocked_address",
        "the host <host> does not resolve, or not only to public addresses",
        False,
    )
    assert (literal.failure.reason, literal.failure.message) == (
        "blocked_address",
        "the URL's host is a loopback address, which is not allowed",
    )
    for result in (local, missing, literal):
        assert b"127.0.0.1" not in result.failure.SerializeToString()
    # The operator's trace has the whole story.
    details = [
        str((s.attributes or {}).get("imagefetch.failure_detail", ""))
        for s in recorded.spans.get_finished_spans()
        if s.name == "imagefetch.attempt"
    ]
    assert any(d.startswith("localhost resolved to 127.0.0.1") for d in details), details
    assert any(d.startswith("nonexistent.invalid did not resolve") for d in details), details
    assert any(d.startswith("127.0.0.1 is a loopback address") for d in details), details
