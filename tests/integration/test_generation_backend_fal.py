"""The fal backend against a stand-in of fal's queue API on 127.0.0.1 (tests/support/fal.py):
a request submitted, followed through the queue with its progress, and its image or video fetched;
the inputs as the template maps them; the render's deadline as fal's start timeout; cancels; fal's
failures mapped to transient or permanent; and the key kept to fal's queue."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    TransientBackendError,
)
from services.generation.backends.fal import DEFAULT_INPUT, DEFAULT_URL, FalBackend, FalSettings
from services.generation.backends.inputs import InputTemplate
from services.generation.backends.video import probe
from shared.settings import ConfigError, Env
from tests.support.backends import connector, generate
from tests.support.fal import FalStandIn
from tests.support.openai_images import png

KEY = "3f1c2b7a-key-id:9e8d7c6b5a4f-key-secret"
MODEL = "fal-ai/flux/dev"
IMAGE = GenerationInput("r1", "image", "a red fox in the snow", "blurry", 64, 48, 8, 7, rules=("no text",))
FAST = FalSettings(
    model=MODEL,
    token=KEY,
    url="http://127.0.0.1:1",
    poll_s=0.01,
    request_timeout_s=2.0,
    max_wait_s=5.0,
    attempts=4,
    backoff_s=0.01,
    backoff_max_s=0.2,
)

Connect = Callable[..., Any]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`await connect(settings={...}, **stand_in_behaviour)` -> (stand-in, backend), closed after."""
    async with connector(functools.partial(FalStandIn, key=KEY), FalBackend.open, FAST) as start:
        yield start


async def _generate(backend: FalBackend, job: GenerationInput = IMAGE) -> tuple[Artifact, list[int]]:
    return await generate(backend, job)


def _start_timeout(fal: FalStandIn) -> float:
    return float(fal.headers["submit"][-1]["X-Fal-Request-Timeout"])


async def test_a_request_is_followed_through_the_queue_to_its_image(connect: Connect) -> None:
    fal, backend = await connect(queued_polls=1, running_polls=4)
    artifact, steps = await _generate(backend)
    [request] = fal.requests.values()
    assert request.model == MODEL and request.app == "fal-ai/flux"  # status and result: no subpath
    assert request.input == {
        "prompt": "a red fox in the snow\nno text",
        "negative_prompt": "blurry",
        "image_size": {"width": 64, "height": 48},
        "num_inference_steps": 8,
        "seed": 7,
    }  # no reference: no image_url
    assert fal.headers["submit"][0]["Authorization"] == f"Key {KEY}"
    assert steps == [2, 4, 6, 8]  # the progress bars the runner logged (2/8, 4/8, 6/8), then done
    assert fal.hits["status"] == 5 and fal.hits["result"] == 1
    with Image.open(io.BytesIO(artifact.data)) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
    assert (artifact.content_type, artifact.width, artifact.height) == ("image/png", 64, 48)
    assert artifact.provider_request_id == request.id
    [download] = fal.file_headers
    assert "Authorization" not in download  # fal's CDN is another origin: the key stays home
    assert fal.cancelled == []


async def test_the_template_maps_the_inputs_and_an_inline_image_is_read(connect: Connect) -> None:
    template = InputTemplate.parse(
        json.dumps(
            {
                "prompt": "{prompt}",
                "image_size": {"width": "{width}", "height": "{height}"},
                "num_inference_steps": "{steps}",
                "image_url": "{image}",
                "sync_mode": True,
            }
        ),
        "RENDERFLOW_BACKEND_FAL_INPUT",
    )
    fal, backend = await connect(running_polls=0, settings={"input_template": template})
    artifact, _ = await _generate(backend, replace(IMAGE, reference=png(4, 4, "a reference")))
    [request] = fal.requests.values()
    assert request.input["image_size"] == {"width": 64, "height": 48}
    assert request.input["image_url"].startswith("data:image/png;base64,")
    assert set(request.input) == {"prompt", "image_size", "num_inference_steps", "image_url", "sync_mode"}
    assert (artifact.width, artifact.height) == (64, 48)
    assert fal.file_headers == []  # sync_mode: the image came as a data URI


async def test_a_video_model_gives_a_checked_mp4(connect: Connect) -> None:
    template = InputTemplate.parse(
        '{"prompt": "{prompt}", "image_size": {"width": "{width}", "height": "{height}"},'
        ' "num_inference_steps": "{steps}", "duration": "{duration_s}", "fps": "{fps}"}',
        "RENDERFLOW_BACKEND_FAL_INPUT",
    )
    fal, backend = await connect(
        settings={"model": "fal-ai/stand-in-video/text-to-video", "input_template": template}
    )
    video = replace(IMAGE, kind="video", width=64, height=64, steps=4, duration_s=1.0, fps=6)
    artifact, steps = await _generate(backend, video)
    info = await probe(artifact.data)
    assert (artifact.content_type, artifact.width, artifact.height) == ("video/mp4", 64, 64)
    assert (info.codec, info.frames) == ("h264", 6)
    assert steps[-1] == 4 and len(fal.file_headers) == 1


async def test_the_renders_deadline_is_sent_as_the_start_timeout(connect: Connect) -> None:
    fal, backend = await connect(running_polls=0, settings={"max_wait_s": 60.0})
    await _generate(backend, replace(IMAGE, deadline=datetime.now(UTC) + timedelta(seconds=30)))
    assert 29.0 <= _start_timeout(fal) <= 30.0
    await _generate(backend, replace(IMAGE, deadline=datetime.now(UTC) + timedelta(hours=1)))
    assert _start_timeout(fal) == 60.0  # never later than this backend waits
    await _generate(backend)
    assert _start_timeout(fal) == 60.0


async def test_a_request_not_started_by_the_deadline_is_ended_by_fal(connect: Connect) -> None:
    fal, backend = await connect(queued_polls=None)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransientBackendError, match="Request timed out") as caught:
        await _generate(backend, replace(IMAGE, deadline=datetime.now(UTC) + timedelta(seconds=0.35)))
    elapsed = asyncio.get_running_loop().time() - started
    assert _start_timeout(fal) == pytest.approx(0.3, abs=0.1) and elapsed < 0.8
    assert caught.value.reason == "request_timeout" and caught.value.provider_request_id == "req-1"
    assert fal.cancelled == []  # fal ended it: nothing left to cancel


async def test_cancelling_the_render_cancels_the_request_at_fal(connect: Connect) -> None:
    fal, backend = await connect(running_polls=None)
    task = asyncio.create_task(_generate(backend))
    await asyncio.wait_for(fal.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fal.cancel_received.wait(), 5)
    assert fal.cancelled == ["req-1"]
    assert fal.headers["cancel"][0]["Authorization"] == f"Key {KEY}"


async def test_a_request_past_the_max_wait_is_cancelled_and_transient(connect: Connect) -> None:
    fal, backend = await connect(running_polls=None, settings={"max_wait_s": 0.3})
    with pytest.raises(TransientBackendError, match=r"within 0\.3 s") as caught:
        await _generate(backend)
    assert caught.value.reason == "timeout" and caught.value.provider_request_id == "req-1"
    assert fal.cancelled == ["req-1"]


@pytest.mark.parametrize(
    ("fail_with", "in_status", "error", "reason"),
    [
        ((500, "CUDA out of memory", "runner_server_error"), True, PermanentBackendError, "provider_failed"),
        ((422, "the prompt was flagged", None), True, PermanentBackendError, "provider_failed"),
        ((422, "the prompt was flagged", None), False, PermanentBackendError, "provider_failed"),
        (
            (503, "Runner disconnected", "runner_disconnected"),
            True,
            TransientBackendError,
            "runner_disconnected",
        ),
        ((499, "Request cancelled", "client_cancelled"), True, PermanentBackendError, "provider_cancelled"),
    ],
    ids=["runner-error", "model-refusal", "refusal-in-result-only", "no-runner", "cancelled-elsewhere"],
)
async def test_a_failed_request_is_classified_with_fals_message(
    connect: Connect,
    fail_with: tuple[int, str, str | None],
    in_status: bool,
    error: type[Exception],
    reason: str,
) -> None:
    fal, backend = await connect(fail_with=fail_with, error_in_status=in_status)
    with pytest.raises(error, match=fail_with[1]) as caught:
        await _generate(backend)
    assert getattr(caught.value, "reason", "") == reason
    assert getattr(caught.value, "provider_request_id", "") == "req-1"
    assert fal.hits["result"] == (0 if in_status else 1) and fal.cancelled == []


async def test_a_request_without_the_models_inputs_fails_as_the_model_refuses(connect: Connect) -> None:
    template = InputTemplate.parse('{"image_size": "landscape_4_3"}', "RENDERFLOW_BACKEND_FAL_INPUT")
    _, backend = await connect(running_polls=0, settings={"input_template": template})
    with pytest.raises(PermanentBackendError, match="prompt") as caught:
        await _generate(backend)
    assert caught.value.reason == "provider_failed"


async def test_a_429_is_retried_honouring_retry_after(connect: Connect) -> None:
    fal, backend = await connect(running_polls=0, failures=[(429, "1")], settings={"backoff_max_s": 0.4})
    await _generate(backend)
    first, second = fal.times[:2]
    # Retry-After: 1, capped at backoff_max_s: far longer than the 0.01 s backoff would wait.
    assert fal.hits["submit"] == 2 and 0.35 <= second - first < 0.9


async def test_server_errors_are_retried_then_transient(connect: Connect) -> None:
    fal, backend = await connect(running_polls=0, failures=[(502, None), (503, None)])
    await _generate(backend)
    assert fal.hits["submit"] == 3 and len(fal.requests) == 1
    fal, backend = await connect(failures=[(500, None)] * 4)
    with pytest.raises(TransientBackendError, match="after 4 tries") as caught:
        await _generate(backend)
    assert caught.value.reason == "http_500" and fal.hits["submit"] == 4 and fal.requests == {}


async def test_a_wrong_key_is_permanent_and_never_echoed(connect: Connect) -> None:
    fal, backend = await connect(settings={"token": "wrong-key-id:wrong-secret"})
    with pytest.raises(PermanentBackendError, match="401") as caught:
        await _generate(backend)
    assert caught.value.reason == "http_401" and fal.hits["submit"] == 1
    assert "wrong-secret" not in str(caught.value)


async def test_the_key_is_never_in_an_error_or_a_log(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    for behaviour in (
        {"fail_with": (500, f"out of memory (key {KEY})", "runner_server_error")},
        {"fail_with": (422, f"bad key {KEY}", None), "error_in_status": False},
        {"failures": [(503, None)], "running_polls": None, "settings": {"max_wait_s": 0.2}},
    ):
        _, backend = await connect(**behaviour)
        with pytest.raises((PermanentBackendError, TransientBackendError)) as caught:
            await _generate(backend)
        errors.append(str(caught.value))
    assert "[token]" in errors[0] and "[token]" in errors[1]
    assert all(KEY not in error and "key-secret" not in error for error in errors)
    assert any("retrying" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert "key-secret" not in record.getMessage() and "key-secret" not in str(record.__dict__)
    assert "key-secret" not in repr(FAST)


def test_settings_are_read_and_checked() -> None:
    required = {"RENDERFLOW_BACKEND_FAL_MODEL": MODEL, "RENDERFLOW_BACKEND_FAL_KEY": KEY}
    settings = FalSettings.from_env(Env(required | {"RENDERFLOW_BACKEND_FAL_POLL_S": "0.25"}))
    assert (settings.model, settings.token, settings.url) == (MODEL, KEY, DEFAULT_URL)
    assert settings.input_template == DEFAULT_INPUT and settings.poll_s == 0.25
    assert DEFAULT_INPUT.fill(replace(IMAGE, reference=png(2, 2, "a reference")))["image_url"].startswith(
        "data:image/png"
    )
    template = {"RENDERFLOW_BACKEND_FAL_INPUT": '{"prompt": "{prompt}", "aspect_ratio": "{aspect_ratio}"}'}
    mapped = FalSettings.from_env(Env(required | template)).input_template
    assert mapped.fill(IMAGE) == {"prompt": IMAGE.prompt, "aspect_ratio": "4:3"}
    for env, says in (
        ({"RENDERFLOW_BACKEND_FAL_KEY": KEY}, "RENDERFLOW_BACKEND_FAL_MODEL is required"),
        ({"RENDERFLOW_BACKEND_FAL_MODEL": MODEL}, "RENDERFLOW_BACKEND_FAL_KEY is required"),
        (required | {"RENDERFLOW_BACKEND_FAL_MODEL": "flux"}, "fal endpoint id"),
        (required | {"RENDERFLOW_BACKEND_FAL_MODEL": "fal-ai/../x y"}, "fal endpoint id"),
        (required | {"RENDERFLOW_BACKEND_FAL_URL": "ftp://queue.fal.run"}, "http"),
        (required | {"RENDERFLOW_BACKEND_FAL_URL": "https://k:s@queue.fal.run"}, "must not hold credentials"),
        (required | {"RENDERFLOW_BACKEND_FAL_INPUT": '{"p": "{nope}"}'}, "unknown placeholders"),
        (required | {"RENDERFLOW_BACKEND_FAL_INPUT": "[1]"}, "JSON object"),
        (required | {"RENDERFLOW_BACKEND_FAL_ATTEMPTS": "0"}, "RENDERFLOW_BACKEND_FAL_ATTEMPTS"),
    ):
        with pytest.raises(ConfigError, match=says) as refused:
            FalSettings.from_env(Env(env))
        assert "key-secret" not in str(refused.value)
