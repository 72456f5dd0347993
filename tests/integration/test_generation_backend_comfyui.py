"""The comfyui backend against stand-in ComfyUI servers on 127.0.0.1 (tests/support/comfyui.py): a
render as a registered workflow filled in, its sampler steps as progress, its output read from the
history; references uploaded; a cancel that stops only its own prompt; failures of the workflow
mapped to permanent or transient; and a pool that moves a render off an instance that dies, goes
silent or refuses, losing none."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from PIL import Image

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    TransientBackendError,
)
from services.generation.backends.comfyui import ComfyUIBackend, ComfyUISettings
from services.generation.backends.comfyui_workflows import BUILT_IN, Workflows
from services.generation.backends.video import probe
from shared.settings import ConfigError, Env
from tests.support.backends import generate
from tests.support.comfyui import WORKFLOW_VIDEO, ComfyUIStandIn, graph_with
from tests.support.openai_images import png

IMAGE = GenerationInput("r1", "image", "a red fox in the snow", "blurry", 64, 48, 6, 7, rules=("no text",))
VIDEO = GenerationInput("v1", "video", "a fox running", "", 64, 48, 4, 3, duration_s=1.0, fps=8)
TOKEN = "comfy-proxy-token-5e4d"

Pool = Callable[..., Any]


def _workflows(folder: Path) -> Workflows:
    """The built-in workflows, and `wan` (Wan 2.1 text to video) with its placeholders."""
    for built_in in BUILT_IN.glob("*.json"):
        (folder / built_in.name).write_text(built_in.read_text())
    wan = graph_with(
        WORKFLOW_VIDEO,
        {
            "3": {"seed": "{seed}", "steps": "{steps}"},
            "6": {"text": "{prompt_with_rules}"},
            "7": {"text": "{negative_prompt}"},
            "40": {"width": "{width}", "height": "{height}", "length": "{frames}"},
            "49": {"fps": "{fps}"},
        },
    )
    (folder / "wan.json").write_text(json.dumps(wan))
    return Workflows.load(str(folder), image="txt2img", reference="img2img", video="wan")


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[Pool]:
    """`await pool(n, slots, settings={...}, **stand_in_behaviour)` -> (stand-ins, backend, metrics
    reader): n instances of `slots` slots each."""
    async with AsyncExitStack() as stack:

        async def start(
            count: int = 1, slots: int = 1, settings: dict[str, Any] | None = None, **behaviour: Any
        ) -> tuple[list[ComfyUIStandIn], ComfyUIBackend, InMemoryMetricReader]:
            servers = [await stack.enter_async_context(ComfyUIStandIn(**behaviour)) for _ in range(count)]
            chosen = ComfyUISettings(
                instances=tuple((server.url, slots) for server in servers),
                workflows=_workflows(tmp_path),
                token=TOKEN,
                poll_s=0.2,
                request_timeout_s=2.0,
                health_s=0.05,
                unavailable_wait_s=0.5,
                backoff_s=0.01,
                backoff_max_s=0.05,
            )
            reader = InMemoryMetricReader()
            backend = await stack.enter_async_context(
                ComfyUIBackend.open(
                    replace(chosen, **(settings or {})), meter_provider=MeterProvider(metric_readers=[reader])
                )
            )
            return servers, backend, reader

        yield start


async def _generate(backend: ComfyUIBackend, job: GenerationInput = IMAGE) -> tuple[Artifact, list[int]]:
    return await generate(backend, job)


def _metrics(reader: InMemoryMetricReader) -> dict[tuple[str, str], float]:
    """{(metric, instance): value} of the pool's gauges and counters."""
    values: dict[tuple[str, str], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, str((point.attributes or {}).get("comfyui.instance", "")))
                    values[key] = values.get(key, 0) + point.value  # type: ignore[union-attr]
    return values


async def test_an_image_is_the_workflow_filled_in_with_its_steps_as_progress(pool: Pool) -> None:
    [comfy], backend, _ = await pool()

    artifact, steps = await _generate(backend)

    [(prompt_id, graph)] = comfy.prompts.items()
    assert graph["6"]["inputs"]["text"] == "a red fox in the snow\nno text"
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert (graph["3"]["inputs"]["seed"], graph["3"]["inputs"]["steps"]) == (7, 6)
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (64, 48)
    assert steps == [1, 2, 3, 4, 5, 6]  # every sampler step; the last once the output is in hand
    with Image.open(io.BytesIO(artifact.data)) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
    assert (artifact.content_type, artifact.provider_request_id) == ("image/png", prompt_id)
    assert prompt_id not in comfy.history  # read, then forgotten: the instance's history does not grow
    [submission] = comfy.submissions
    assert submission["client_id"].startswith("renderflow-") and submission["prompt_id"] == prompt_id


async def test_a_reference_is_uploaded_and_the_reference_workflow_loads_it(pool: Pool) -> None:
    [comfy], backend, _ = await pool()
    reference = png(80, 60, "a reference")

    artifact, _ = await _generate(backend, replace(IMAGE, reference=reference))

    [(name, uploaded)] = comfy.uploads.items()
    assert uploaded == reference and name.startswith("renderflow-") and name.endswith(".png")
    [graph] = comfy.prompts.values()
    assert graph["10"] == {"class_type": "LoadImage", "inputs": {"image": name}}
    assert artifact.width == 64


async def test_a_video_and_a_workflow_the_render_names(pool: Pool) -> None:
    [comfy], backend, _ = await pool()

    video, steps = await _generate(backend, VIDEO)
    named, _ = await _generate(backend, replace(IMAGE, workflow="wan", kind="video", duration_s=0.5, fps=8))

    info = await probe(video.data)
    assert (video.content_type, info.width, info.height) == ("video/mp4", 64, 48)
    assert steps[-1] == VIDEO.steps
    graphs = list(comfy.prompts.values())
    assert graphs[0]["40"]["inputs"]["length"] == 8 and graphs[0]["49"]["inputs"]["fps"] == 8
    assert named.content_type == "video/mp4" and graphs[1]["40"]["inputs"]["length"] == 4


async def test_a_workflow_comfyui_refuses_fails_the_render_with_its_reasons(pool: Pool) -> None:
    [comfy], backend, _ = await pool(models={"checkpoints": ("sdxl.safetensors",)})

    with pytest.raises(PermanentBackendError) as refused:
        await _generate(backend)

    assert refused.value.reason == "invalid_workflow"
    assert "node 4 (CheckpointLoaderSimple)" in str(refused.value)
    assert comfy.history == {} and backend.pool.instances[0].up  # nothing ran; the instance is fine


@pytest.mark.parametrize(
    ("failure", "expected", "reason"),
    [
        (
            {"fail_with": "mat1 and mat2 shapes cannot be multiplied"},
            PermanentBackendError,
            "execution_error",
        ),
        (
            {"fail_with": "Allocation on device", "fail_type": "torch.OutOfMemoryError"},
            TransientBackendError,
            "out_of_memory",
        ),
    ],
)
async def test_an_error_in_the_workflow_is_permanent_unless_memory_ran_out(
    pool: Pool, failure: dict[str, str], expected: type[Exception], reason: str
) -> None:
    _, backend, _ = await pool(fail_at_step=2, **failure)

    with pytest.raises(expected) as failed:
        await _generate(backend)

    assert failed.value.reason == reason  # type: ignore[attr-defined]
    assert failure["fail_with"] in str(failed.value) and "node 3 (KSampler)" in str(failed.value)
    assert failed.value.provider_request_id  # type: ignore[attr-defined]


async def test_cancelling_a_render_stops_its_own_prompt_only(pool: Pool) -> None:
    [comfy], backend, _ = await pool(slots=2, hold_at_step=2)  # a second prompt waits in ComfyUI's queue
    first = asyncio.create_task(_generate(backend, IMAGE))
    running = await comfy.started(step=2)
    second = asyncio.create_task(_generate(backend, replace(IMAGE, render_id="r2", seed=8)))
    await comfy.wait_for(lambda: len(comfy.pending_prompt_ids) == 1)
    [waiting] = comfy.pending_prompt_ids

    second.cancel()  # waiting in ComfyUI's queue: taken off it
    await comfy.wait_for(lambda: waiting in comfy.removed)
    third = asyncio.create_task(_generate(backend, replace(IMAGE, render_id="r3", seed=9)))
    await comfy.wait_for(lambda: len(comfy.pending_prompt_ids) == 1)
    first.cancel()  # running: interrupted, by its id
    await comfy.wait_for(lambda: running in comfy.interrupts)
    comfy.hold_at_step = None
    artifact, _ = await asyncio.wait_for(third, 10)

    assert comfy.interrupt_requests == [running] and comfy.interrupts == [running]
    assert comfy.removed == [waiting]
    assert artifact.provider_request_id not in (running, waiting)
    for task in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_silent_websocket_and_a_dropped_one_still_end_with_the_output(pool: Pool) -> None:
    [silent], quiet_backend, _ = await pool(silent_ws=True)
    artifact, _ = await _generate(quiet_backend)
    assert artifact.content_type == "image/png"
    assert silent.hits["GET /history/{prompt_id}"] >= 1  # what it learnt, it learnt from the history

    [dropping], backend, _ = await pool(drop_ws_after=4, step_s=0.02)
    artifact, _ = await _generate(backend)
    assert artifact.content_type == "image/png" and dropping.ws_drops >= 1


async def test_an_instance_that_dies_mid_render_loses_nothing(pool: Pool) -> None:
    servers, backend, reader = await pool(2, hold_at_step=2)
    task = asyncio.create_task(_generate(backend))
    prompt_id = await _started_anywhere(servers)
    dying = next(server for server in servers if server.running_prompt_id == prompt_id)
    survivor = next(server for server in servers if server is not dying)
    survivor.hold_at_step = None

    await dying.die()
    artifact, steps = await task

    assert artifact.provider_request_id in survivor.prompts and artifact.provider_request_id != prompt_id
    assert steps[-1] == IMAGE.steps
    metrics = _metrics(reader)
    assert metrics[("renderflow.comfyui.failovers", dying.url)] == 1
    assert metrics[("renderflow.comfyui.instance.up", dying.url)] == 0
    assert metrics[("renderflow.comfyui.instance.up", survivor.url)] == 1

    await dying.revive()  # its next health checks (requests it sees) bring it back
    await dying.wait_for(lambda: _metrics(reader)[("renderflow.comfyui.instance.up", dying.url)] == 1)


async def test_an_instance_that_refuses_prompts_is_left_for_another(pool: Pool) -> None:
    servers, backend, _ = await pool(2, reject_prompts=1)
    servers[1].reject_prompts = 0

    artifact, _ = await _generate(backend)

    assert (
        artifact.provider_request_id in servers[1].prompts
        or artifact.provider_request_id in servers[0].prompts
    )


async def test_with_no_instance_up_the_render_goes_back_to_the_queue(pool: Pool) -> None:
    [comfy], backend, _ = await pool()
    await comfy.die()

    with pytest.raises(TransientBackendError) as unavailable:
        await _generate(backend)

    assert unavailable.value.reason == "no_instance"
    assert comfy.url in str(unavailable.value)


def test_settings_name_the_instances_and_their_slots() -> None:
    env = Env(
        {
            "RENDERFLOW_BACKEND_COMFYUI_URLS": "http://gpu-a:8188, http://gpu-b:8188*2",
            "RENDERFLOW_BACKEND_COMFYUI_TOKEN": TOKEN,
        }
    )
    settings = ComfyUISettings.from_env(env)
    assert settings.instances == (("http://gpu-a:8188", 1), ("http://gpu-b:8188", 2))
    assert TOKEN not in repr(settings)
    assert sorted(settings.workflows.by_name) == ["img2img", "txt2img"]
    for bad, complaint in [
        ({}, "RENDERFLOW_BACKEND_COMFYUI_URLS is required"),
        ({"RENDERFLOW_BACKEND_COMFYUI_URLS": "http://a:8188*0"}, "slots after \\* must be > 0"),
        ({"RENDERFLOW_BACKEND_COMFYUI_URLS": "ftp://a"}, "must be an http"),
        (
            {
                "RENDERFLOW_BACKEND_COMFYUI_URLS": "http://a:8188",
                "RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_IMAGE": "x",
            },
            "no workflow 'x'",
        ),
    ]:
        with pytest.raises(ConfigError, match=complaint):
            ComfyUISettings.from_env(Env(bad))


async def _started_anywhere(servers: list[ComfyUIStandIn]) -> str:
    """The id of the first prompt held at its step on any of `servers`."""
    done, pending = await asyncio.wait(
        [asyncio.create_task(server.started(step=2)) for server in servers],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for task in pending:
        task.cancel()
    return next(iter(done)).result()
