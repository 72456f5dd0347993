"""The built-in backend: real PNG images and H.264 MP4 videos painted from prompt, seed, rules and
reference.

Deterministic: the same (prompt, seed, rules, reference, size, steps, duration, fps) gives the same
bytes. The prompt and seed choose the palette (colour words in the prompt pull its hue), the rules
choose the pattern and shift the palette, each step paints finer shapes over coarser ones, and the
reference image is blended in. A video is a time-lapse of that painting, one step after another,
seen through a camera that pans across it, with a few shapes of the rules' pattern circling over
it. Pillow work runs in threads and ffmpeg in a subprocess, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)
from services.generation.backends.video import encoding

# Hues (0..1) that a colour word in the prompt pulls the palette towards.
_COLOUR_WORDS = {
    "red": 0.0,
    "orange": 0.08,
    "gold": 0.12,
    "yellow": 0.16,
    "green": 0.33,
    "teal": 0.47,
    "cyan": 0.5,
    "blue": 0.62,
    "purple": 0.77,
    "violet": 0.8,
    "pink": 0.92,
}
_PATTERNS = ("circles", "rectangles", "polygons", "waves")
_REFERENCE_WEIGHT = 0.4
_SPRITES = 3
# How much larger than a video frame the painting is, so that the camera has room to pan.
_PAN_MARGIN = 0.125
# Pixels of a video frame made at once (see Animation.frame).
_BAND_PIXELS = 256 * 1024

RGBA = tuple[int, int, int, int]


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def _rgb(hue: float, lightness: float, saturation: float, alpha: int = 255) -> RGBA:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, lightness, saturation)
    return round(r * 255), round(g * 255), round(b * 255), alpha


@dataclass(frozen=True)
class Shape:
    """One shape of a pattern: where, how big, and (for polygons) how many sides at what turn."""

    colour: RGBA
    size: float
    sides: int = 0
    turn: float = 0.0

    def draw(self, draw: ImageDraw.ImageDraw, pattern: str, cx: float, cy: float, width: int) -> None:
        size, colour = self.size, self.colour
        if pattern == "circles":
            draw.ellipse((cx - size, cy - size, cx + size, cy + size), fill=colour)
        elif pattern == "rectangles":
            draw.rectangle((cx - size, cy - size / 2, cx + size, cy + size / 2), fill=colour)
        elif pattern == "polygons":
            points = [
                (
                    cx + size * math.cos(self.turn + math.tau * k / self.sides),
                    cy + size * math.sin(self.turn + math.tau * k / self.sides),
                )
                for k in range(self.sides)
            ]
            draw.polygon(points, fill=colour)
        else:
            amplitude, period = size / 2, max(8.0, size * 2)
            points = [(x, cy + amplitude * math.sin(x / period * math.tau)) for x in range(0, width + 8, 8)]
            draw.line(points, fill=colour, width=max(1, int(size / 6)))


class Painting:
    """One image in progress: a gradient background, then one layer of shapes per step."""

    def __init__(self, job: GenerationInput) -> None:
        self.job = job
        prompt_seed = _digest(job.prompt, str(job.seed))
        rule_seed = _digest(*job.rules) if job.rules else prompt_seed
        self._rng = random.Random(prompt_seed ^ rule_seed)
        words = [w.strip(".,!?;:").lower() for w in job.prompt.split()]
        hues = [_COLOUR_WORDS[w] for w in words if w in _COLOUR_WORDS]
        base = hues[0] if hues else (prompt_seed % 1000) / 1000
        # Three shades of the base hue, and two harmony colours that the rules choose.
        spread = (0.08, 0.33, 0.5, 0.17)[rule_seed % 4]
        self.pattern = _PATTERNS[(rule_seed >> 8) % len(_PATTERNS)]
        saturation = 0.5 + 0.1 * (prompt_seed % 4)
        self.palette = [
            _rgb(base, 0.25, saturation),
            _rgb(base, 0.7, saturation),
            _rgb(base, 0.5, saturation),
            _rgb(base + spread, 0.55, saturation),
            _rgb(base - spread, 0.45, saturation),
        ]
        w, h = job.width, job.height
        # Decoded first, so that a bad reference fails the render before any work is done.
        self._reference = self._fitted_reference((w, h))
        gradient = Image.linear_gradient("L").resize((w, h))
        top = Image.new("RGB", (w, h), self.palette[0][:3])
        bottom = Image.new("RGB", (w, h), self.palette[1][:3])
        # RGB, drawn on in RGBA mode: translucent shapes blend into what is below.
        self.image = Image.composite(bottom, top, gradient)

    def _fitted_reference(self, size: tuple[int, int]) -> Image.Image | None:
        if self.job.reference is None:
            return None
        try:
            with Image.open(io.BytesIO(self.job.reference)) as reference:
                return ImageOps.fit(reference.convert("RGB"), size)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise PermanentBackendError("the reference image cannot be decoded", "bad_reference") from exc

    def paint(self, step: int) -> None:
        """Paints the shapes of `step` (1-based): coarse first, finer as steps go on."""
        job, rng = self.job, self._rng
        w, h = job.width, job.height
        scale = max(0.04, 0.45 * (1 - (step - 1) / max(job.steps, 1)))
        draw = ImageDraw.Draw(self.image, "RGBA")
        for _ in range(3):
            r, g, b, _a = rng.choice(self.palette[1:])
            colour = (r, g, b, rng.randint(60, 150))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            size = scale * min(w, h) * rng.uniform(0.5, 1.0)
            sides, turn = (
                (rng.randint(3, 6), rng.uniform(0, math.tau)) if self.pattern == "polygons" else (0, 0)
            )
            Shape(colour, size, sides, turn).draw(draw, self.pattern, cx, cy, w)

    def composite(self) -> Image.Image:
        """The picture as it stands, with the reference blended in."""
        if self._reference is None:
            return self.image
        return Image.blend(self.image, self._reference, _REFERENCE_WEIGHT)

    def png(self) -> bytes:
        """The finished picture, encoded as PNG."""
        out = io.BytesIO()
        self.composite().save(out, "PNG", compress_level=3)
        return out.getvalue()


@dataclass(frozen=True)
class Sprite:
    """A shape that circles once or twice around a point during the video."""

    shape: Shape
    cx: float
    cy: float
    radius: float
    phase: float
    turns: int

    def position(self, t: float) -> tuple[float, float]:
        angle = self.phase + math.tau * self.turns * t
        return self.cx + self.radius * math.cos(angle), self.cy + self.radius * math.sin(angle)


class Animation:
    """A video's frames: the painting, grown step by step on a canvas a little larger than the
    frame, seen through a camera that pans across it, with sprites of its pattern moving over it.

    H.264 in yuv420p needs even sides, so an odd width or height is rounded up by one pixel (the
    frame is painted at that size, not padded); `width` and `height` are the encoded size.
    """

    def __init__(self, job: GenerationInput) -> None:
        self.width = job.width + job.width % 2
        self.height = job.height + job.height % 2
        self.frames = max(1, round(job.fps * job.duration_s))
        self.duration_s = self.frames / job.fps
        self._margin = (round(self.width * _PAN_MARGIN), round(self.height * _PAN_MARGIN))
        canvas = replace(job, width=self.width + self._margin[0], height=self.height + self._margin[1])
        self.painting = Painting(canvas)
        rng = random.Random(_digest("motion", job.prompt, str(job.seed), *job.rules))
        self._pan = rng.uniform(0, math.tau)
        side = min(self.width, self.height)
        self._sprites = [
            Sprite(
                Shape(
                    (*rng.choice(self.painting.palette[1:])[:3], 170),
                    side * rng.uniform(0.05, 0.1),
                    rng.randint(3, 6),
                    rng.uniform(0, math.tau),
                ),
                cx=rng.uniform(0.3, 0.7) * self.width,
                cy=rng.uniform(0.3, 0.7) * self.height,
                radius=side * rng.uniform(0.1, 0.3),
                phase=rng.uniform(0, math.tau),
                turns=rng.choice((-2, -1, 1, 2)),
            )
            for _ in range(_SPRITES)
        ]
        self._still = self.painting.composite()

    def paint(self, step: int) -> None:
        """Paints one more step of the underlying painting; the frames after it show it."""
        self.painting.paint(step)
        self._still = self.painting.composite()

    def frame(self, index: int) -> Iterator[bytes]:
        """Frame `index` (0-based) as raw RGB bytes, in horizontal bands: no single Pillow call
        then holds the GIL for long, even at 2048 x 2048."""
        t = index / max(self.frames - 1, 1)
        # The camera moves along a line through the canvas centre, in the direction the seed chose.
        x = round(self._margin[0] * (0.5 + 0.5 * math.cos(self._pan) * (2 * t - 1)))
        y = round(self._margin[1] * (0.5 + 0.5 * math.sin(self._pan) * (2 * t - 1)))
        positions = [sprite.position(t) for sprite in self._sprites]
        rows = max(16, _BAND_PIXELS // self.width)
        for top in range(0, self.height, rows):
            bottom = min(top + rows, self.height)
            band = self._still.crop((x, y + top, x + self.width, y + bottom))
            draw = ImageDraw.Draw(band, "RGBA")
            for sprite, (cx, cy) in zip(self._sprites, positions, strict=True):
                sprite.shape.draw(draw, self.painting.pattern, cx, cy - top, self.width)
            yield band.tobytes()


class ProceduralBackend:
    """Paints images and videos locally; `step_ms` of latency per step stands in for a real
    model's pace."""

    name = "procedural"

    def __init__(self, step_ms: float = 0.0) -> None:
        self._step_s = step_ms / 1000

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        if job.kind == "image":
            return await self._image(job, on_progress)
        if job.kind == "video":
            return await self._video(job, on_progress)
        raise PermanentBackendError(f"the procedural backend does not render {job.kind}", "unsupported_kind")

    async def _image(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        painting = await asyncio.to_thread(Painting, job)
        for step in range(1, job.steps + 1):
            await asyncio.to_thread(painting.paint, step)
            await self._pace()
            await on_progress(step, job.steps)
        data = await asyncio.to_thread(painting.png)
        return Artifact(data, "image/png", job.width, job.height)

    async def _video(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        """Each step paints a layer and encodes its share of the frames; the last step also waits
        for ffmpeg to finish the file."""
        if job.fps < 1 or job.duration_s <= 0:
            raise PermanentBackendError("a video needs fps >= 1 and a positive duration", "bad_params")
        animation = await asyncio.to_thread(Animation, job)
        into = job.output_file()
        async with encoding(animation.width, animation.height, job.fps, into) as encoder:
            written = 0
            for step in range(1, job.steps + 1):
                await asyncio.to_thread(animation.paint, step)
                while written < animation.frames * step // job.steps:
                    await encoder.write(animation.frame(written))  # made in the encoder's thread
                    written += 1
                await self._pace()
                if step < job.steps:
                    await on_progress(step, job.steps)
            path = await encoder.finish()
            data = b"" if into else await asyncio.to_thread(path.read_bytes)
        await on_progress(job.steps, job.steps)
        size = (animation.width, animation.height, animation.duration_s)
        return Artifact(data, "video/mp4", *size, file=into)

    async def _pace(self) -> None:
        if self._step_s:
            await asyncio.sleep(self._step_s)
