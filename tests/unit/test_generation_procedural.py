"""The procedural backend paints real, deterministic PNGs that prompt, rules and reference shape."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import pytest
from PIL import Image, ImageStat

from services.generation.backends import GenerationInput, PermanentBackendError
from services.generation.backends.procedural import ProceduralBackend

BASE = GenerationInput("r1", "image", "a calm scene", "", 80, 48, 6, 42)


async def _paint(job: GenerationInput, step_ms: float = 0.0) -> tuple[bytes, list[tuple[int, int]]]:
    steps: list[tuple[int, int]] = []

    async def progress(step: int, total: int) -> None:
        steps.append((step, total))

    artifact = await ProceduralBackend(step_ms).generate(job, progress)
    assert (artifact.content_type, artifact.width, artifact.height) == ("image/png", job.width, job.height)
    return artifact.data, steps


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


async def test_a_png_of_the_requested_size_with_one_progress_call_per_step() -> None:
    data, steps = await _paint(BASE)
    assert _png(data).size == (80, 48)
    assert steps == [(i, 6) for i in range(1, 7)]


async def test_the_same_inputs_give_the_same_bytes() -> None:
    assert (await _paint(BASE))[0] == (await _paint(BASE))[0]


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a stormy sea"},
        {"seed": 43},
        {"rules": ("paint in thick strokes",)},
    ],
)
async def test_prompt_seed_and_rules_change_the_picture(change: dict[str, object]) -> None:
    assert (await _paint(BASE))[0] != (await _paint(replace(BASE, **change)))[0]  # type: ignore[arg-type]


async def test_colour_words_pull_the_palette() -> None:
    red = ImageStat.Stat(_png((await _paint(replace(BASE, prompt="a red barn")))[0])).mean
    blue = ImageStat.Stat(_png((await _paint(replace(BASE, prompt="a blue lake")))[0])).mean
    assert red[0] > red[2] and blue[2] > blue[0]


async def test_the_reference_is_blended_in() -> None:
    white = io.BytesIO()
    Image.new("RGB", (10, 10), "white").save(white, "PNG")
    plain = ImageStat.Stat(_png((await _paint(BASE))[0])).mean
    referenced = ImageStat.Stat(_png((await _paint(replace(BASE, reference=white.getvalue())))[0])).mean
    assert all(r > p for r, p in zip(referenced, plain, strict=True))
    with pytest.raises(PermanentBackendError):
        await _paint(replace(BASE, reference=b"not an image"))


async def test_video_is_a_permanent_error_for_now() -> None:
    with pytest.raises(PermanentBackendError, match="video"):
        await _paint(replace(BASE, kind="video"))


async def test_cancelling_stops_between_steps() -> None:
    steps: list[int] = []
    first = asyncio.Event()

    async def progress(step: int, total: int) -> None:
        steps.append(step)
        first.set()

    task = asyncio.create_task(ProceduralBackend(step_ms=20).generate(replace(BASE, steps=100), progress))
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(steps) < 100
