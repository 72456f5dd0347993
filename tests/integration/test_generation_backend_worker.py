"""Backends chosen by the worker's settings, end to end through a real generation server and an
in-process worker: the http backend against the fake provider, the openai backend against its
stand-in, and procedural videos."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from renderflow.v1 import generation_pb2 as pb

from services.generation.backends import GenerationInput
from services.generation.backends.http import HttpBackendSettings
from services.generation.backends.openai_images import OpenAiImagesSettings
from services.generation.backends.selection import BackendSettings, open_backends
from services.generation.backends.video import probe
from shared.settings import ConfigError, Env
from tests.support.fal import FalStandIn
from tests.support.gateway_stack import eventually
from tests.support.generation import (
    Stub,
    WorkerFactory,
    accounts_of,
    finished,
    output,
    status_name,
    submit,
)
from tests.support.observed_stack import Recorder
from tests.support.openai_images import OpenAiImagesStandIn
from tests.support.provider import Provider
from tests.support.replicate import MODEL as REPLICATE_MODEL
from tests.support.replicate import ReplicateStandIn

TOKEN = "worker-test-token"


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    async with Provider(token=TOKEN, polls_to_finish=3) as server:
        yield server


def _http_for_images(provider: Provider) -> BackendSettings:
    http = HttpBackendSettings(url=provider.url, token=TOKEN, poll_s=0.02, max_wait_s=10, backoff_s=0.01)
    return BackendSettings(image="http", video="procedural", http=http)


async def test_an_image_render_is_made_by_the_provider(
    stub: Stub, start_worker: WorkerFactory, provider: Provider
) -> None:
    await start_worker(backend=_http_for_images(provider))
    render = await submit(stub, width=96, height=64, steps=6)

    done = await finished(stub, render.id)

    assert status_name(done) == "succeeded", done.error
    produced = provider.predictions["p1"].output
    assert b"".join(chunk.data for chunk in await output(stub, render.id)) == produced
    assert (done.output.content_type, done.output.width, done.output.height) == ("image/png", 96, 64)
    assert done.output.bytes == len(produced) and done.progress == 1.0
    assert (done.backend, done.provider_request_id) == ("http", "p1")  # the prediction it was
    assert provider.predictions["p1"].input["prompt"] == "a red fox in the snow"


async def test_an_image_render_is_made_by_an_openai_compatible_api(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    async with OpenAiImagesStandIn(token=TOKEN) as api:
        openai = OpenAiImagesSettings(url=api.url, token=TOKEN, model="dall-e-2", backoff_s=0.01)
        await start_worker(backend=BackendSettings(image="openai", video="procedural", openai=openai))
        render = await submit(stub, width=96, height=64, steps=6)
        refused = await submit(stub, prompt="something against the content policy")

        done, failed = await finished(stub, render.id), await finished(stub, refused.id)

    assert status_name(done) == "succeeded", done.error
    assert (done.output.content_type, done.output.width, done.output.height) == ("image/png", 96, 64)
    assert api.requests[0]["model"] == "dall-e-2" and api.requests[0]["size"] == "96x64"
    assert (done.backend, done.provider_request_id) == ("openai", "req_1")
    assert status_name(failed) == "failed" and failed.attempts == 1
    assert (failed.error.code, failed.error.reason) == ("generation_failed", "content_policy_violation")


async def test_images_by_replicate_and_videos_by_fal_as_the_settings_choose(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    async with ReplicateStandIn(token=TOKEN) as replicate, FalStandIn(key=TOKEN) as fal:
        backend = BackendSettings.from_env(
            Env(
                {
                    "RENDERFLOW_BACKEND_IMAGE": "replicate",
                    "RENDERFLOW_BACKEND_VIDEO": "fal",
                    "RENDERFLOW_BACKEND_REPLICATE_URL": replicate.url,
                    "RENDERFLOW_BACKEND_REPLICATE_TOKEN": TOKEN,
                    "RENDERFLOW_BACKEND_REPLICATE_MODEL": REPLICATE_MODEL,
                    "RENDERFLOW_BACKEND_REPLICATE_POLL_S": "0.02",
                    "RENDERFLOW_BACKEND_FAL_URL": fal.url,
                    "RENDERFLOW_BACKEND_FAL_KEY": TOKEN,
                    "RENDERFLOW_BACKEND_FAL_MODEL": "fal-ai/wan/video",  # the stand-in films what names video
                    "RENDERFLOW_BACKEND_FAL_POLL_S": "0.02",
                }
            )
        )
        await start_worker(backend=backend)
        image = await submit(stub, width=96, height=64, steps=6)
        video = await submit(
            stub, kind=pb.RENDER_KIND_VIDEO, width=64, height=64, steps=4, duration_s=1.0, fps=8
        )

        made, filmed = await finished(stub, image.id), await finished(stub, video.id)

    assert status_name(made) == "succeeded", made.error
    assert (made.output.content_type, made.output.width, made.output.height) == ("image/png", 96, 64)
    assert (made.backend, made.provider_request_id) == ("replicate", next(iter(replicate.predictions)))
    assert status_name(filmed) == "succeeded", filmed.error
    assert (filmed.backend, filmed.output.content_type) == ("fal", "video/mp4")
    assert filmed.provider_request_id in fal.requests


async def test_one_projects_renders_are_made_by_the_backend_named_for_it(
    stub: Stub, start_worker: WorkerFactory, provider: Provider
) -> None:
    accounts = accounts_of(stub)
    special = await accounts.project("alice", "brand-kit")
    await accounts.project("alice")
    backend = BackendSettings.from_env(
        Env(
            {
                "RENDERFLOW_BACKEND_PROJECTS": json.dumps({special.id: {"image": "http"}}),
                "RENDERFLOW_BACKEND_HTTP_URL": provider.url,
                "RENDERFLOW_BACKEND_HTTP_TOKEN": TOKEN,
                "RENDERFLOW_BACKEND_HTTP_POLL_S": "0.02",
            }
        )
    )
    await start_worker(backend=backend)
    by_provider = await submit(stub, project="brand-kit")
    video = await submit(stub, project="brand-kit", kind=pb.RENDER_KIND_VIDEO, duration_s=0.5, fps=4)
    others = await submit(stub)

    done = [await finished(stub, render.id) for render in (by_provider, video, others)]

    assert [status_name(render) for render in done] == ["succeeded"] * 3, [r.error for r in done]
    assert [render.backend for render in done] == ["http", "procedural", "procedural"]
    assert provider.hits["create"] == 1  # the project's image, and nothing else


def test_a_project_backend_that_cannot_serve_stops_the_worker_at_start() -> None:
    for projects, complaint in [
        ({"p1": "dalle"}, "must name one of"),
        ({"p1": {"video": "openai"}}, "makes images only"),
        ({"p1": {"sound": "http"}}, "one per kind"),
        (["p1"], "keyed by project id"),
    ]:
        with pytest.raises(ConfigError, match=complaint):
            BackendSettings.from_env(Env({"RENDERFLOW_BACKEND_PROJECTS": json.dumps(projects)}))


async def test_a_failure_at_the_provider_fails_the_render_with_its_message(
    stub: Stub, start_worker: WorkerFactory, provider: Provider
) -> None:
    provider.fail_with = "the model refused the prompt"
    await start_worker(backend=_http_for_images(provider))
    render = await submit(stub)

    done = await finished(stub, render.id)

    assert status_name(done) == "failed" and done.attempts == 1
    assert (done.error.code, done.error.reason) == ("generation_failed", "provider_failed")
    assert "the model refused the prompt" in done.error.message and not done.error.retryable
    assert done.provider_request_id == "p1"  # the failed prediction, to look up at the provider


async def test_a_video_render_is_a_procedural_mp4(
    stub: Stub, start_worker: WorkerFactory, provider: Provider
) -> None:
    await start_worker(backend=_http_for_images(provider))
    render = await submit(
        stub, kind=pb.RENDER_KIND_VIDEO, width=64, height=64, steps=4, duration_s=1.0, fps=12
    )

    done = await finished(stub, render.id)

    assert status_name(done) == "succeeded", done.error
    data = b"".join(chunk.data for chunk in await output(stub, render.id))
    info = await probe(data)
    assert (done.output.content_type, done.output.duration_s) == ("video/mp4", 1.0)
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 64, 64, 12)
    assert provider.hits["create"] == 0  # videos stay with the procedural backend


async def test_the_job_and_the_render_span_name_the_backend_that_runs_it(
    stub: Stub, start_worker: WorkerFactory, provider: Provider, database_url: str, recorder: Recorder
) -> None:
    provider.polls_to_finish = 25  # running long enough to be seen
    await start_worker(backend=_http_for_images(provider))
    render = await submit(stub)

    seen: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:

        async def running() -> bool:
            cur = await conn.execute(
                "SELECT backend FROM generation.jobs WHERE render_id = %s AND state = 'running'", [render.id]
            )
            row = await cur.fetchone()
            seen.extend(row or ())
            return row is not None

        await eventually(running, timeout_s=10)
    backend = seen[0]
    done = await finished(stub, render.id)

    assert status_name(done) == "succeeded", done.error
    assert backend == "http"
    await recorder.wait_for(lambda spans: any(_renders_of(spans, render.id)))
    (span,) = _renders_of(recorder.spans, render.id)
    assert span.attributes is not None and span.attributes["render.backend"] == "http"
    # The provider's id of the request is on the span of the phase that called it.
    [generation] = [
        s
        for s in recorder.spans
        if s.name == "generation" and s.parent and s.parent.span_id == span.context.span_id
    ]
    assert (generation.attributes or {}).get("render.provider_request_id") == done.provider_request_id == "p1"


def _renders_of(spans: list[ReadableSpan], render_id: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == "render" and (s.attributes or {}).get("render.id") == render_id]


async def test_the_worker_opens_the_backends_its_kinds_use_by_name() -> None:
    job = GenerationInput("r1", "image", "a red fox", "", 64, 64, 2, 1)

    async def progress(step: int, total: int) -> None:
        return None

    settings = BackendSettings()
    assert settings.by_kind() == {"image": "procedural", "video": "procedural"}
    async with open_backends(settings) as backends:
        assert list(backends) == ["procedural"]
        image = await backends["procedural"].generate(job, progress)
        video = await backends["procedural"].generate(
            replace(job, kind="video", duration_s=0.5, fps=4), progress
        )
    assert (image.content_type, video.content_type) == ("image/png", "video/mp4")

    http = HttpBackendSettings(url="https://api.example.com/v1", token="t")
    settings = BackendSettings(image="http", video="procedural", http=http)
    assert settings.by_kind() == {"image": "http", "video": "procedural"}
    async with open_backends(settings) as backends:
        assert sorted(backends) == ["http", "procedural"]
