"""The prediction API's messages: the request body sent, the prediction as read back, and the
checks an output must pass before it becomes an Artifact."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from services.generation.backends import Artifact, GenerationInput, PermanentBackendError
from services.generation.backends.video import probe

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
"""The statuses a prediction ends in (`aborted`: Replicate's, for one whose deadline passed before it
started)."""
MAX_MESSAGE = 500
"""The most characters of a provider's message kept (in errors shown to users)."""
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
_TQDM = re.compile(r"(\d+)\s*/\s*(\d+)")
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")
_IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class Prediction:
    """The provider's view of one prediction."""

    id: str
    status: str
    progress: float | None = None
    output: str = ""
    error: str = ""
    get_url: str = ""
    """Where the provider says to poll it (its `urls.get`), if it says."""
    cancel_url: str = ""
    """Where the provider says to cancel it (its `urls.cancel`), if it says."""

    @classmethod
    def from_json(cls, data: Any) -> Prediction:
        """Reads a create or poll answer; PermanentBackendError if it has no usable id."""
        if not isinstance(data, dict) or not _ID.match(str(data.get("id", ""))):
            raise PermanentBackendError(
                "the provider answered without a usable prediction id", "bad_response"
            )
        output = data.get("output")
        if isinstance(output, list):
            output = output[0] if output else None
        urls = data["urls"] if isinstance(data.get("urls"), dict) else {}
        return cls(
            id=str(data["id"]),
            status=str(data.get("status", "")),
            progress=fraction(data.get("progress"), data.get("logs")),
            output=output if isinstance(output, str) else "",
            error="" if data.get("error") is None else str(data["error"])[:MAX_MESSAGE],
            get_url=_text(urls.get("get")),
            cancel_url=_text(urls.get("cancel")),
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def fraction(progress: Any, logs: Any) -> float | None:
    """How far along the prediction is (0..1): its `progress` (a fraction or a percentage), else
    the last `12/50` or `24%` in its logs (as progress bars print them), else None."""
    if isinstance(progress, int | float) and not isinstance(progress, bool) and math.isfinite(progress):
        return max(0.0, min(1.0, progress / 100 if progress > 1 else float(progress)))
    lines = logs.strip().splitlines() if isinstance(logs, str) else []
    last = lines[-1] if lines else ""
    if match := _TQDM.findall(last):
        done, total = map(int, match[-1])
        return min(1.0, done / total) if total else None
    if match := _PERCENT.findall(last):
        return min(1.0, float(match[-1]) / 100)
    return None


def request_body(job: GenerationInput) -> dict[str, Any]:
    """The create request: the render's prompt, rules and parameters, the reference as a data URL."""
    params: dict[str, Any] = {
        "kind": job.kind,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "rules": list(job.rules),
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "seed": job.seed,
    }
    if job.kind == "video":
        params |= {"duration_s": job.duration_s, "fps": job.fps}
    if job.reference is not None:
        encoded = base64.b64encode(job.reference).decode()
        params["image"] = f"data:{sniff(job.reference) or 'application/octet-stream'};base64,{encoded}"
    return {"input": params}


def sniff(data: bytes | Path) -> str:
    """The media type that the first bytes (of `data`, or of the file it names) announce, or ""
    when unknown."""
    if isinstance(data, Path):
        with data.open("rb") as file:
            data = file.read(16)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        return "video/mp4"
    return ""


def decode_data_url(value: str) -> tuple[bytes, str]:
    """The bytes and media type of a base64 `data:` URL (an output given inline)."""
    header, _, payload = value.partition(",")
    if not header.endswith(";base64"):
        raise PermanentBackendError("the output data URL is not base64", "bad_output")
    try:
        return base64.b64decode(payload, validate=True), header.removeprefix("data:").split(";")[0]
    except ValueError:
        raise PermanentBackendError("the output data URL is not valid base64", "bad_output") from None


async def output_artifact(job: GenerationInput, data: bytes | Path, declared: str) -> Artifact:
    """The output as an Artifact, once its bytes (or its file's: a video downloaded into the
    render's workdir) say it is what the render asked for (a PNG, JPEG or WebP image that decodes,
    or an MP4 with a video stream) and its declared type does not say otherwise (an HTML error
    page served with 200 is refused); the bytes decide the type."""
    declared = declared.split(";")[0].strip().lower()
    sniffed = sniff(data)
    wanted = "image/" if job.kind == "image" else "video/"
    generic = declared in ("", "application/octet-stream", "binary/octet-stream")
    if not sniffed.startswith(wanted) or not (generic or declared.startswith(wanted)):
        noun, found = ("an image" if job.kind == "image" else "a video"), sniffed or "unknown bytes"
        raise PermanentBackendError(
            f"the output is not {noun} (declared {declared or 'nothing'}, found {found})", "bad_output"
        )
    if job.kind == "video":
        info = await probe(data)
        if isinstance(data, Path):
            return Artifact(b"", sniffed, info.width, info.height, info.duration_s, file=data)
        return Artifact(data, sniffed, info.width, info.height, info.duration_s)
    if isinstance(data, Path):  # an image is not asked for as a file; read one given anyway
        data = await asyncio.to_thread(data.read_bytes)
    width, height, image_format = await asyncio.to_thread(_decoded, data)
    return Artifact(data, _IMAGE_TYPES[image_format], width, height)


def _decoded(data: bytes) -> tuple[int, int, str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format not in _IMAGE_TYPES:
                raise PermanentBackendError(f"the output is a {image.format} image", "bad_output")
            return image.width, image.height, image.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise PermanentBackendError("the output image cannot be decoded", "bad_output") from exc
