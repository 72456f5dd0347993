"""The procedural backend paints real, deterministic PNGs and H.264 MP4s that prompt, seed, rules and
reference shape, one progress call per step, without blocking the event loop."""

from __future__ import annotations

import asyncio
import io
import itertools
import subprocess
import time
from dataclasses import replace

import psutil
import pytest
from PIL import Image, ImageChops, ImageStat

from services.generation.backends import Artifact, GenerationInput, PermanentBackendError
from services.generation.backends.procedural import ProceduralBackend
from services.generation.backends.video import ffmpeg, probe

IMAGE = GenerationInput("r1", "image", "a calm scene", "", 80, 48, 6, 42)
VIDEO = replace(IMAGE, kind="video", width=96, height=64, steps=5, duration_s=1.5, fps=8)


async def _render(job: GenerationInput, step_ms: float = 0.0) -> tuple[Artifact, list[tuple[int, int]]]:
    steps: list[tuple[int, int]] = []

    async def progress(step: int, total: int) -> None:
        steps.append((step, total))

    return await ProceduralBackend(step_ms).generate(job, progress), steps


async def _paint(job: GenerationInput) -> bytes:
    artifact, _ = await _render(job)
    assert (artifact.content_type, artifact.width, artifact.height) == ("image/png", job.width, job.height)
    return artifact.data


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def _white_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (10, 10), "white").save(out, "PNG")
    return out.getvalue()


def _difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel value, 0..255."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def _frames(artifact: Artifact) -> list[Image.Image]:
    """The decoded frames of an MP4 (faststart, so ffmpeg can read it from a pipe)."""
    decode = [ffmpeg(), "-v", "error", "-i", "-", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(decode, input=artifact.data, capture_output=True, check=True).stdout
    size = (artifact.width, artifact.height)
    length = size[0] * size[1] * 3
    return [Image.frombytes("RGB", size, raw[at : at + length]) for at in range(0, len(raw), length)]


async def test_a_png_of_the_requested_size_with_one_progress_call_per_step() -> None:
    artifact, steps = await _render(IMAGE)
    assert _png(artifact.data).size == (80, 48)
    assert steps == [(i, 6) for i in range(1, 7)]


async def test_the_same_inputs_give_the_same_bytes() -> None:
    assert await _paint(IMAGE) == await _paint(IMAGE)


@pytest.mark.parametrize(
    "change", [{"prompt": "a stormy sea"}, {"seed": 43}, {"rules": ("paint in thick strokes",)}]
)
async def test_prompt_seed_and_rules_change_the_picture(change: dict[str, object]) -> None:
    plain = _png(await _paint(IMAGE))
    changed = _png(await _paint(replace(IMAGE, **change)))  # type: ignore[arg-type]
    assert _difference(plain, changed) > 5


async def test_colour_words_pull_the_palette() -> None:
    red = ImageStat.Stat(_png(await _paint(replace(IMAGE, prompt="a red barn")))).mean
    blue = ImageStat.Stat(_png(await _paint(replace(IMAGE, prompt="a blue lake")))).mean
    assert red[0] > red[2] and blue[2] > blue[0]


async def test_the_reference_is_blended_in() -> None:
    plain = ImageStat.Stat(_png(await _paint(IMAGE))).mean
    referenced = ImageStat.Stat(_png(await _paint(replace(IMAGE, reference=_white_png())))).mean
    assert all(r > p + 20 for r, p in zip(referenced, plain, strict=True))
    with pytest.raises(PermanentBackendError, match="reference"):
        await _paint(replace(IMAGE, reference=b"not an image"))


async def test_a_video_is_an_h264_mp4_of_the_asked_size_length_and_frame_count() -> None:
    artifact, steps = await _render(VIDEO)
    assert artifact.content_type == "video/mp4" and artifact.data[4:8] == b"ftyp"
    assert (artifact.width, artifact.height, artifact.duration_s) == (96, 64, 1.5)
    info = await probe(artifact.data)
    assert (info.codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 96, 64)
    assert info.frames == 12 and info.duration_s == pytest.approx(1.5, abs=0.05)
    assert steps == [(i, 5) for i in range(1, 6)]


async def test_odd_sides_are_rounded_up_to_even_for_h264() -> None:
    artifact, _ = await _render(replace(VIDEO, width=95, height=63))
    info = await probe(artifact.data)
    assert (artifact.width, artifact.height) == (info.width, info.height) == (96, 64)


async def test_a_video_is_deterministic_and_moves() -> None:
    first, _ = await _render(VIDEO)
    again, _ = await _render(VIDEO)
    assert first.data == again.data
    frames = _frames(first)
    assert len(frames) == 12
    # Consecutive frames differ (the camera pans, sprites move, the painting grows).
    assert all(_difference(a, b) > 0.5 for a, b in itertools.pairwise(frames))


@pytest.mark.parametrize(
    "change", [{"prompt": "a stormy sea"}, {"seed": 43}, {"rules": ("paint in thick strokes",)}]
)
async def test_prompt_seed_and_rules_change_the_video(change: dict[str, object]) -> None:
    plain, _ = await _render(VIDEO)
    changed, _ = await _render(replace(VIDEO, **change))  # type: ignore[arg-type]
    assert plain.data != changed.data
    assert _difference(_frames(plain)[-1], _frames(changed)[-1]) > 5


async def test_the_reference_shows_in_the_video() -> None:
    plain, _ = await _render(VIDEO)
    referenced, _ = await _render(replace(VIDEO, reference=_white_png()))
    brightness = [
        sum(ImageStat.Stat(_frames(artifact)[-1]).mean) / 3
        for name, artifact in (("a", plain), ("b", referenced))
    ]
    assert brightness[1] > brightness[0] + 20


@pytest.mark.parametrize("job", [IMAGE, VIDEO])
async def test_the_step_latency_paces_each_step(job: GenerationInput) -> None:
    started = time.perf_counter()
    await _render(job, step_ms=40)
    assert time.perf_counter() - started >= job.steps * 0.04


async def test_a_video_without_fps_or_duration_is_refused() -> None:
    with pytest.raises(PermanentBackendError, match="fps"):
        await _render(replace(VIDEO, fps=0))


@pytest.mark.parametrize("job", [replace(IMAGE, steps=100), replace(VIDEO, steps=100, duration_s=10)])
async def test_cancelling_stops_between_steps(job: GenerationInput) -> None:
    steps: list[int] = []
    first = asyncio.Event()

    async def progress(step: int, total: int) -> None:
        steps.append(step)
        first.set()

    task = asyncio.create_task(ProceduralBackend(step_ms=20).generate(job, progress))
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(steps) < 100


async def test_cancelling_a_video_kills_its_encoder() -> None:
    before = _ffmpeg_children()
    first = asyncio.Event()

    async def progress(step: int, total: int) -> None:
        first.set()

    job = replace(VIDEO, steps=50, duration_s=10)
    task = asyncio.create_task(ProceduralBackend(step_ms=20).generate(job, progress))
    await asyncio.wait_for(first.wait(), 10)
    assert len(_ffmpeg_children()) == len(before) + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _ffmpeg_children() == before


def _ffmpeg_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()}


async def test_the_event_loop_stays_responsive_during_large_renders() -> None:
    lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lag = max(lag, time.perf_counter() - before - 0.005)

    task = asyncio.create_task(ticker())
    big = replace(IMAGE, width=2048, height=2048, steps=10)
    await _render(big)
    await _render(replace(big, kind="video", duration_s=0.5, fps=8))
    done.set()
    await task
    assert lag < 0.1
