"""The replicate backend against a stand-in of Replicate's HTTP API on 127.0.0.1
(tests/support/replicate.py): models run by name or by version, progress read from the models'
logs, sync mode, inputs mapped by template, outputs downloaded without the token, cancels that reach
Replicate, deadlines, and failures mapped to transient or permanent."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
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
from services.generation.backends.inputs import InputTemplate
from services.generation.backends.replicate import ReplicateBackend, ReplicateSettings
from services.generation.backends.video import probe
from shared.settings import ConfigError, Env
from tests.support.openai_images import png
from tests.support.replicate import ANIMATOR, ANIMATOR_VERSION, MODEL, VERSION, ReplicateStandIn

TOKEN = "r8_Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Jj1"
IMAGE = GenerationInput("r1", "image", "a red fox in the snow", "blurry", 64, 48, 8, 7, rules=("no text",))
FAST = ReplicateSettings(
    token=TOKEN,
    model=MODEL,
    url="http://127.0.0.1:1",
    poll_s=0.005,
    request_timeout_s=2.0,
    max_wait_s=5.0,
    attempts=4,
    backoff_s=0.01,
    backoff_max_s=0.2,
)


class Steps(list[int]):
    """A render's `on_progress`: the steps it reports, out of `total`."""

    def __init__(self, total: int = IMAGE.steps) -> None:
        super().__init__()
        self.total = total

    async def __call__(self, step: int, total: int) -> None:
        assert total == self.total
        self.append(step)


@pytest.fixture
async def replicate() -> AsyncIterator[ReplicateStandIn]:
    """The stand-in; a test sets its behaviour (its fields) before the backend calls."""
    async with ReplicateStandIn(token=TOKEN) as api:
        yield api


def opened(api: ReplicateStandIn, **settings: Any) -> AbstractAsyncContextManager[ReplicateBackend]:
    """A backend on the stand-in, with the FAST settings but for `settings`."""
    return ReplicateBackend.open(replace(FAST, url=api.url, **settings))


@pytest.fixture
async def backend(replicate: ReplicateStandIn) -> AsyncIterator[ReplicateBackend]:
    async with opened(replicate) as fast:
        yield fast


def _png_size(artifact: Artifact) -> tuple[int, int]:
    with Image.open(io.BytesIO(artifact.data)) as image:
        assert image.format == "PNG"
        return image.size


async def test_an_official_model_runs_by_name_reporting_its_steps(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    artifact = await backend.generate(IMAGE, steps := Steps())
    [prediction] = replicate.predictions.values()
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # one a step of the model's progress bar, the last at the end
    assert _png_size(artifact) == (64, 48) and artifact.content_type == "image/png"
    assert artifact.data == prediction.output and artifact.provider_request_id == prediction.id
    [(headers, body)] = replicate.creates
    assert "version" not in body and prediction.model == MODEL  # POST /v1/models/acme/painter/predictions
    assert headers["Authorization"] == f"Bearer {TOKEN}" and "Prefer" not in headers
    assert headers["Cancel-After"] == "15s"  # max_wait_s (5 s) and the grace
    assert replicate.hits["poll"] == 9 and replicate.hits["file"] == 1
    assert "Authorization" not in replicate.file_headers[0]  # the file host never sees the token


@pytest.mark.parametrize("version", [VERSION, f"{MODEL}:{VERSION}"], ids=["id", "owner/name:id"])
async def test_a_version_runs_through_the_predictions_route(
    replicate: ReplicateStandIn, version: str
) -> None:
    async with opened(replicate, model="", version=version) as backend:
        artifact = await backend.generate(IMAGE, steps := Steps())
    [(_, body)] = replicate.creates
    assert body["version"] == version and steps[-1] == IMAGE.steps
    assert _png_size(artifact) == (64, 48)


async def test_urls_on_another_origin_are_not_followed(replicate: ReplicateStandIn) -> None:
    # Behind a proxy that does not rewrite them, the prediction's urls name Replicate's origin (here
    # the file host's): polls and cancels go through the configured URL, where the token may go.
    replicate.never_ends, replicate.urls_base = True, f"{replicate.files_url}/v1"
    async with opened(replicate, max_wait_s=0.2) as backend:
        with pytest.raises(TransientBackendError, match="within"):
            await backend.generate(IMAGE, Steps())
    assert replicate.hits["poll"] >= 2 and len(replicate.cancelled) == 1 and replicate.file_headers == []


async def test_sync_mode_gets_a_quick_prediction_without_polling(replicate: ReplicateStandIn) -> None:
    replicate.step_s = 0.001
    async with opened(replicate, wait_s=5) as backend:
        artifact = await backend.generate(IMAGE, steps := Steps())
    assert replicate.creates[0][0]["Prefer"] == "wait=5"
    assert replicate.hits["poll"] == 0 and steps == [IMAGE.steps]
    assert _png_size(artifact) == (64, 48)


async def test_inputs_follow_the_default_template_or_the_operators(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    await backend.generate(replace(IMAGE, reference=png(4, 4, "reference")), Steps())
    given = replicate.creates[0][1]["input"]
    assert given.pop("image").startswith("data:image/png;base64,")
    assert given == {
        "prompt": "a red fox in the snow\nno text",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 48,
        "num_inference_steps": 8,
        "seed": 7,
    }
    template = InputTemplate.parse(
        '{"prompt": "{prompt}", "aspect_ratio": "{aspect_ratio}", "num_inference_steps": "{steps}",'
        ' "image": "{image}", "go_fast": true}',
        "RENDERFLOW_BACKEND_REPLICATE_INPUT",
    )
    async with opened(replicate, input_template=template) as mapped:
        await mapped.generate(IMAGE, Steps())
    assert replicate.creates[1][1]["input"] == {
        "prompt": "a red fox in the snow",
        "aspect_ratio": "4:3",
        "num_inference_steps": 8,
        "go_fast": True,
    }  # no reference: no image


@pytest.mark.parametrize("output_as", ["url", "data"])
async def test_an_output_as_one_url_or_a_data_url(
    replicate: ReplicateStandIn, backend: ReplicateBackend, output_as: str
) -> None:
    replicate.output_as = output_as
    artifact = await backend.generate(IMAGE, Steps())
    [prediction] = replicate.predictions.values()
    assert artifact.data == prediction.output
    assert replicate.hits["file"] == (1 if output_as == "url" else 0)


async def test_a_video_model_gives_a_checked_mp4(replicate: ReplicateStandIn) -> None:
    template = InputTemplate.parse(
        '{"prompt": "{prompt}", "width": "{width}", "height": "{height}", "num_inference_steps": "{steps}",'
        ' "duration": "{duration_s}", "fps": "{fps}"}',
        "RENDERFLOW_BACKEND_REPLICATE_INPUT",
    )
    version = f"{ANIMATOR}:{ANIMATOR_VERSION}"
    video = replace(IMAGE, kind="video", width=64, height=64, steps=4, duration_s=1.0, fps=6)
    async with opened(replicate, model="", version=version, input_template=template) as backend:
        artifact = await backend.generate(video, steps := Steps(video.steps))
    info = await probe(artifact.data)
    assert (artifact.content_type, artifact.width, artifact.height) == ("video/mp4", 64, 64)
    assert (info.codec, info.frames) == ("h264", 6) and steps == [1, 2, 3, 4]


async def test_cancelling_the_render_cancels_the_prediction(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    replicate.never_ends = True
    task = asyncio.create_task(backend.generate(IMAGE, Steps()))
    await asyncio.wait_for(replicate.created.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(replicate.cancel_received.wait(), 5)
    [prediction] = replicate.predictions.values()
    assert replicate.cancelled == [prediction.id] and prediction.status == "canceled"


async def test_a_prediction_that_never_ends_times_out_and_is_cancelled(replicate: ReplicateStandIn) -> None:
    replicate.never_ends = True
    async with opened(replicate, max_wait_s=0.3) as backend:
        with pytest.raises(TransientBackendError, match=r"within 0\.3 s") as caught:
            await backend.generate(IMAGE, Steps())
    [prediction] = replicate.predictions.values()
    assert caught.value.reason == "timeout" and caught.value.provider_request_id == prediction.id
    assert replicate.cancelled == [prediction.id] and prediction.status == "canceled"
    assert replicate.creates[0][0]["Cancel-After"] == "11s"  # Replicate would stop it too, a little later


async def test_a_deadline_sooner_than_the_max_wait_bounds_the_prediction(replicate: ReplicateStandIn) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=29.5)
    async with opened(replicate, max_wait_s=900.0) as backend:
        await backend.generate(replace(IMAGE, deadline=soon), Steps())
        assert backend.cancel_after(IMAGE) == "15m10s"  # without a deadline: the max wait, and the grace
    assert replicate.creates[0][0]["Cancel-After"] == "40s"


@pytest.mark.parametrize(
    ("started", "error", "reason"),
    [(False, TransientBackendError, "timeout"), (True, PermanentBackendError, "provider_cancelled")],
    ids=["aborted-before-starting", "cancelled-while-running"],
)
async def test_a_prediction_stopped_at_its_replicate_deadline(
    replicate: ReplicateStandIn, started: bool, error: type[Exception], reason: str
) -> None:
    replicate.never_ends = True
    async with opened(replicate, poll_s=0.05) as backend:
        task = asyncio.create_task(backend.generate(IMAGE, Steps()))
        await asyncio.wait_for(replicate.created.wait(), 5)
        [prediction] = replicate.predictions.values()
        if started:
            await asyncio.wait_for(replicate.polled.wait(), 5)
        replicate.reach_deadline(prediction.id)
        with pytest.raises(error) as caught:
            await task
    assert getattr(caught.value, "reason", "") == reason
    assert prediction.status == ("canceled" if started else "aborted") and replicate.cancelled == []


async def test_a_failed_prediction_is_permanent_with_its_error_redacted(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    replicate.fail_with = f"CUDA out of memory (token {TOKEN})"
    with pytest.raises(PermanentBackendError, match="CUDA out of memory") as caught:
        await backend.generate(IMAGE, Steps())
    [prediction] = replicate.predictions.values()
    assert caught.value.reason == "provider_failed" and caught.value.provider_request_id == prediction.id
    assert TOKEN not in str(caught.value) and replicate.cancelled == []


async def test_a_429_is_retried_after_its_retry_after(replicate: ReplicateStandIn) -> None:
    # Retry-After says 1 s; capped by backoff_max_s (0.3 s), it is still well above the backoff.
    replicate.create_failures = [(429, "1")]
    async with opened(replicate, backoff_max_s=0.3) as backend:
        await backend.generate(IMAGE, Steps())
    first, second = replicate.times["create"]
    assert 0.28 <= second - first < 1.0 and len(replicate.predictions) == 1


async def test_server_errors_on_polls_are_retried(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    replicate.poll_failures = [(503, None), (500, None)]
    await backend.generate(IMAGE, Steps())
    assert replicate.hits["poll"] == 9 + 2


async def test_server_errors_on_create_are_retried_then_transient(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    replicate.create_failures = [(500, None)] * 4
    with pytest.raises(TransientBackendError, match="after 4 tries") as caught:
        await backend.generate(IMAGE, Steps())
    assert caught.value.reason == "http_500" and replicate.hits["create"] == 4 and not replicate.predictions


async def test_a_lost_create_answer_makes_a_second_prediction_bounded_by_its_deadline(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    # Replicate has no idempotency key: a create retried after a lost answer creates again. The
    # first is left to its Cancel-After (see the module docstring of the backend).
    replicate.lost_creates = 1
    artifact = await backend.generate(IMAGE, Steps())
    first, second = replicate.predictions.values()
    assert artifact.provider_request_id == second.id and first.status == "starting"
    assert all(headers["Cancel-After"] == "15s" for headers, _ in replicate.creates)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"token": "r8_wrong"}, "Unauthenticated"),
        ({"model": "", "version": "f" * 64}, "Invalid version or not permitted"),
        ({"model": "acme/nothing"}, "could not be found"),
    ],
    ids=["bad-token", "unknown-version", "unknown-model"],
)
async def test_refusals_are_permanent_with_replicates_title_and_detail(
    replicate: ReplicateStandIn, settings: dict[str, Any], says: str
) -> None:
    async with opened(replicate, **settings) as backend:
        with pytest.raises(PermanentBackendError, match=says) as caught:
            await backend.generate(IMAGE, Steps())
    assert replicate.hits["create"] == 1 and "r8_" not in str(caught.value)


async def test_invalid_input_is_permanent_with_the_fields_detail(
    replicate: ReplicateStandIn, backend: ReplicateBackend
) -> None:
    with pytest.raises(
        PermanentBackendError, match=r"input\.width: Must be less than or equal to 1024"
    ) as caught:
        await backend.generate(replace(IMAGE, width=2048), Steps())
    assert caught.value.reason == "http_422" and replicate.hits["create"] == 1 and not replicate.predictions


async def test_the_token_is_never_logged(
    replicate: ReplicateStandIn, backend: ReplicateBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    replicate.create_failures, replicate.poll_failures = [(503, None)], [(502, None)]
    await backend.generate(IMAGE, Steps())
    replicate.fail_with = f"bad key {TOKEN}"
    with pytest.raises(PermanentBackendError) as failed:
        await backend.generate(IMAGE, Steps())
    replicate.fail_with, replicate.never_ends = "", True
    async with opened(replicate, max_wait_s=0.1) as slow:
        with pytest.raises(TransientBackendError) as timed_out:
            await slow.generate(IMAGE, Steps())
    assert TOKEN not in str(failed.value) and TOKEN not in str(timed_out.value)
    assert any("retrying" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and TOKEN not in str(record.__dict__)


def test_settings_are_read_and_checked() -> None:
    base = {"RENDERFLOW_BACKEND_REPLICATE_TOKEN": TOKEN}
    settings = ReplicateSettings.from_env(Env(base | {"RENDERFLOW_BACKEND_REPLICATE_MODEL": MODEL}))
    assert (settings.url, settings.model, settings.version, settings.wait_s) == (
        "https://api.replicate.com/v1",
        MODEL,
        "",
        0,
    )
    assert settings.input_template.fill(IMAGE)["num_inference_steps"] == IMAGE.steps
    assert TOKEN not in repr(settings)
    pinned = ReplicateSettings.from_env(
        Env(
            base
            | {
                "RENDERFLOW_BACKEND_REPLICATE_VERSION": VERSION,
                "RENDERFLOW_BACKEND_REPLICATE_WAIT_S": "10",
                "RENDERFLOW_BACKEND_REPLICATE_INPUT": '{"prompt": "{prompt}"}',
            }
        )
    )
    assert (pinned.version, pinned.wait_s, pinned.input_template.fill(IMAGE)) == (
        VERSION,
        10,
        {"prompt": IMAGE.prompt},
    )
    model = base | {"RENDERFLOW_BACKEND_REPLICATE_MODEL": MODEL}
    for env, says in (
        ({"RENDERFLOW_BACKEND_REPLICATE_MODEL": MODEL}, "TOKEN is required"),
        (base, "got neither"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_VERSION": VERSION}, "not both"),
        (base | {"RENDERFLOW_BACKEND_REPLICATE_MODEL": "painter"}, "must be owner/name"),
        (base | {"RENDERFLOW_BACKEND_REPLICATE_MODEL": f"{MODEL}:{VERSION}"}, "a version goes in"),
        (base | {"RENDERFLOW_BACKEND_REPLICATE_VERSION": "v1"}, "64-character version id"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_WAIT_S": "61"}, "at most 60"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_WAIT_S": "-1"}, "at least 0"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_WAIT_S": "30"}, "must exceed"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_URL": "https://u:p@proxy.example/v1"}, "credentials"),
        (model | {"RENDERFLOW_BACKEND_REPLICATE_INPUT": '{"p": "{nope}"}'}, "unknown placeholders"),
    ):
        with pytest.raises(ConfigError, match=says):
            ReplicateSettings.from_env(Env(env))
