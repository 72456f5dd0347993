"""The http backend against a real prediction API on 127.0.0.1 (tests/support/provider.py) that is
quick, slow, failing, flaky, rate limiting or never done."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    TransientBackendError,
)
from services.generation.backends.http import HttpBackend, HttpBackendSettings
from services.generation.backends.inputs import InputTemplate
from services.generation.backends.video import probe
from shared.settings import ConfigError, Env
from tests.support.backends import connector, generate
from tests.support.provider import Provider

TOKEN = "tok-9f8e7d6c5b4a-secret"
IMAGE = GenerationInput("r1", "image", "a red fox in the snow", "", 64, 48, 8, 7, rules=("no text",))
FAST = HttpBackendSettings(
    url="http://127.0.0.1:1",
    token=TOKEN,
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
    async with connector(functools.partial(Provider, token=TOKEN), HttpBackend.open, FAST) as start:
        yield start


async def _generate(backend: HttpBackend, job: GenerationInput = IMAGE) -> tuple[Artifact, list[int]]:
    return await generate(backend, job)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, "PNG")
    return out.getvalue()


async def test_a_quick_prediction_gives_the_providers_image(connect: Connect) -> None:
    provider, backend = await connect()
    artifact, steps = await _generate(backend, replace(IMAGE, reference=_png(4, 4)))
    prediction = provider.predictions["p1"]
    assert artifact.data == prediction.output
    assert (artifact.content_type, artifact.width, artifact.height) == ("image/png", 64, 48)
    assert steps == [8]
    sent = prediction.input
    assert (sent["prompt"], sent["width"], sent["steps"], sent["seed"], sent["rules"]) == (
        "a red fox in the snow",
        64,
        8,
        7,
        ["no text"],
    )
    assert sent["image"].startswith("data:image/png;base64,")
    assert provider.idempotency_keys[0].startswith("r1-")


async def test_the_operators_template_names_the_models_inputs(connect: Connect) -> None:
    template = InputTemplate.parse(
        '{"prompt": "{prompt_with_rules}", "width": "{width}", "height": "{height}",'
        ' "aspect_ratio": "{aspect_ratio}", "num_inference_steps": "{steps}", "image_url": "{image}"}',
        "RENDERFLOW_BACKEND_HTTP_INPUT",
    )
    provider, backend = await connect(settings={"input_template": template})
    artifact, _ = await _generate(backend)
    assert provider.predictions["p1"].input == {
        "prompt": "a red fox in the snow\nno text",
        "width": 64,
        "height": 48,
        "aspect_ratio": "4:3",
        "num_inference_steps": 8,
    }  # no reference: no image_url
    assert (artifact.width, artifact.height) == (64, 48)


def test_a_template_is_read_and_checked_with_the_settings() -> None:
    env = {"RENDERFLOW_BACKEND_HTTP_URL": "https://models.example/v1"}
    settings = HttpBackendSettings.from_env(Env(env | {"RENDERFLOW_BACKEND_HTTP_INPUT": '{"p": "{prompt}"}'}))
    assert settings.input_template is not None and settings.input_template.fill(IMAGE) == {"p": IMAGE.prompt}
    with pytest.raises(ConfigError, match="unknown placeholders"):
        HttpBackendSettings.from_env(Env(env | {"RENDERFLOW_BACKEND_HTTP_INPUT": '{"p": "{nope}"}'}))


async def test_a_slow_prediction_is_polled_and_its_progress_reported(connect: Connect) -> None:
    provider, backend = await connect(polls_to_finish=4)
    artifact, steps = await _generate(backend)
    assert artifact.content_type == "image/png"
    assert provider.hits["poll"] == 4
    assert steps == [2, 4, 6, 8]  # progress 0.25, 0.5, 0.75 of 8 steps, then done


async def test_progress_is_read_from_the_logs_when_there_is_no_progress_field(connect: Connect) -> None:
    _, backend = await connect(polls_to_finish=4, progress_in="logs")
    _, steps = await _generate(backend)
    assert steps == [2, 4, 6, 8]


@pytest.mark.parametrize("output_as", ["list", "data"])
async def test_outputs_as_a_list_or_a_data_url(connect: Connect, output_as: str) -> None:
    provider, backend = await connect(output_as=output_as)
    artifact, _ = await _generate(backend)
    assert artifact.data == provider.predictions["p1"].output
    assert provider.hits["file"] == (1 if output_as == "list" else 0)


async def test_a_video_prediction_gives_a_checked_mp4(connect: Connect) -> None:
    _, backend = await connect(polls_to_finish=2)
    video = replace(IMAGE, kind="video", width=64, height=64, steps=4, duration_s=1.0, fps=6)
    artifact, steps = await _generate(backend, video)
    info = await probe(artifact.data)
    assert (artifact.content_type, artifact.width, artifact.height) == ("video/mp4", 64, 64)
    assert (info.codec, info.frames) == ("h264", 6)
    assert artifact.duration_s == pytest.approx(1.0, abs=0.05)
    assert steps[-1] == 4


async def test_a_failed_prediction_is_permanent_with_the_providers_message(connect: Connect) -> None:
    provider, backend = await connect(polls_to_finish=2, fail_with="NSFW content detected")
    with pytest.raises(PermanentBackendError, match="NSFW content detected") as caught:
        await _generate(backend)
    assert caught.value.reason == "provider_failed"
    assert provider.cancelled == []


async def test_a_prediction_that_never_ends_times_out_at_the_max_wait_and_is_cancelled(
    connect: Connect,
) -> None:
    provider, backend = await connect(polls_to_finish=None, settings={"max_wait_s": 0.5})
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransientBackendError, match=r"within 0\.5 s") as caught:
        await _generate(backend)
    elapsed = asyncio.get_running_loop().time() - started
    assert caught.value.reason == "timeout" and 0.5 <= elapsed < 2.0
    assert provider.cancelled == ["p1"] and provider.predictions["p1"].status == "canceled"


async def test_server_errors_on_create_are_retried_without_creating_twice(connect: Connect) -> None:
    provider, backend = await connect(create_errors=2, commit_failed_creates=True)
    artifact, _ = await _generate(backend)
    assert provider.hits["create"] == 3 and len(provider.predictions) == 1
    assert len(set(provider.idempotency_keys)) == 1
    assert artifact.data == provider.predictions["p1"].output


async def test_server_errors_on_polls_are_retried(connect: Connect) -> None:
    provider, backend = await connect(polls_to_finish=2, poll_errors=2)
    await _generate(backend)
    assert provider.hits["poll"] == 4


async def test_a_provider_that_keeps_failing_is_transient_after_the_last_try(connect: Connect) -> None:
    provider, backend = await connect(create_errors=100)
    with pytest.raises(TransientBackendError, match="after 4 tries") as caught:
        await _generate(backend)
    assert caught.value.reason == "http_500" and provider.hits["create"] == 4


async def test_a_429_waits_for_retry_after(connect: Connect) -> None:
    provider, backend = await connect(rate_limited=1, retry_after="1", settings={"backoff_max_s": 5.0})
    await _generate(backend)
    first, second = provider.times["create"]
    assert second - first >= 0.95


async def test_a_long_retry_after_is_capped(connect: Connect) -> None:
    provider, backend = await connect(rate_limited=2, retry_after="3600")
    started = asyncio.get_running_loop().time()
    await _generate(backend)
    assert provider.hits["create"] == 3 and asyncio.get_running_loop().time() - started < 2.0


async def test_a_refused_request_is_permanent_and_not_retried(connect: Connect) -> None:
    provider, backend = await connect(settings={"token": "wrong"})
    with pytest.raises(PermanentBackendError, match="401") as caught:
        await _generate(backend)
    assert caught.value.reason == "http_401" and provider.hits["create"] == 1


async def test_an_output_that_is_not_an_image_is_refused(connect: Connect) -> None:
    _, backend = await connect(output_as="html")
    with pytest.raises(PermanentBackendError, match="not an image") as caught:
        await _generate(backend)
    assert caught.value.reason == "bad_output"


async def test_cancelling_the_render_cancels_the_prediction(connect: Connect) -> None:
    provider, backend = await connect(polls_to_finish=None)
    task = asyncio.create_task(_generate(backend))
    await asyncio.wait_for(provider.created.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(provider.cancel_received.wait(), 5)
    assert provider.cancelled == ["p1"]


async def test_the_token_is_never_logged(connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    for behaviour in (
        {"polls_to_finish": 2, "create_errors": 1, "poll_errors": 1},
        {"fail_with": f"out of memory (key {TOKEN})"},  # a provider that echoes the token
        {"polls_to_finish": None, "settings": {"max_wait_s": 0.2}},
    ):
        _, backend = await connect(**behaviour)
        try:
            await _generate(backend)
        except (PermanentBackendError, TransientBackendError) as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and caplog.records
    assert any("retrying" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and TOKEN not in str(record.__dict__)
    assert all(TOKEN not in error for error in errors)
    assert TOKEN not in repr(FAST)
