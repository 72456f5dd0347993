"""The built-in backend: real PNG images painted step by step from prompt, seed, rules and reference.

Deterministic: the same (prompt, seed, rules, reference, size, steps) gives the same bytes. The
prompt and seed choose the palette (colour words in the prompt pull its hue), the rules choose the
pattern and shift the palette, each step paints finer shapes over coarser ones, and the reference
image is blended in at the end. Pillow work runs in threads so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import io
import math
import random

from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)

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


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def _rgb(hue: float, lightness: float, saturation: float, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, lightness, saturation)
    return round(r * 255), round(g * 255), round(b * 255), alpha


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
        gradient = Image.linear_gradient("L").resize((w, h))
        top = Image.new("RGB", (w, h), self.palette[0][:3])
        bottom = Image.new("RGB", (w, h), self.palette[1][:3])
        # RGB, drawn on in RGBA mode: translucent shapes blend into what is below.
        self.image = Image.composite(bottom, top, gradient)

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
            if self.pattern == "circles":
                draw.ellipse((cx - size, cy - size, cx + size, cy + size), fill=colour)
            elif self.pattern == "rectangles":
                draw.rectangle((cx - size, cy - size / 2, cx + size, cy + size / 2), fill=colour)
            elif self.pattern == "polygons":
                sides = rng.randint(3, 6)
                turn = rng.uniform(0, math.tau)
                points = [
                    (
                        cx + size * math.cos(turn + math.tau * k / sides),
                        cy + size * math.sin(turn + math.tau * k / sides),
                    )
                    for k in range(sides)
                ]
                draw.polygon(points, fill=colour)
            else:
                amplitude, period = size / 2, max(8.0, size * 2)
                points = [(x, cy + amplitude * math.sin(x / period * math.tau)) for x in range(0, w + 8, 8)]
                draw.line(points, fill=colour, width=max(1, int(size / 6)))

    def finish(self) -> bytes:
        """Blends the reference in and encodes the PNG."""
        image = self.image
        if self.job.reference is not None:
            try:
                with Image.open(io.BytesIO(self.job.reference)) as reference:
                    fitted = ImageOps.fit(reference.convert("RGB"), image.size)
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                raise PermanentBackendError("the reference image cannot be decoded", "bad_reference") from exc
            image = Image.blend(image, fitted, _REFERENCE_WEIGHT)
        out = io.BytesIO()
        image.save(out, "PNG", compress_level=3)
        return out.getvalue()


class ProceduralBackend:
    """Paints images locally; `step_ms` of latency per step stands in for a real model's pace."""

    name = "procedural"

    def __init__(self, step_ms: float = 0.0) -> None:
        self._step_s = step_ms / 1000

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        if job.kind != "image":
            raise PermanentBackendError(
                f"the procedural backend does not render {job.kind} yet", "unsupported_kind"
            )
        painting = await asyncio.to_thread(Painting, job)
        for step in range(1, job.steps + 1):
            await asyncio.to_thread(painting.paint, step)
            if self._step_s:
                await asyncio.sleep(self._step_s)
            await on_progress(step, job.steps)
        data = await asyncio.to_thread(painting.finish)
        return Artifact(data, "image/png", job.width, job.height)
