"""Deciding whether bytes are an image: magic bytes first, then Pillow must read and decode them all.
For references fetched from URLs (imagefetch) and uploaded (generation).

Whatever the origin's or the client's Content-Type claims, only the bytes count; the type reported
is the one they really are.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

from PIL import Image as PilImage

from shared.url_guard import NOT_AN_IMAGE, TOO_LARGE, FetchFailure


@dataclass(frozen=True)
class Decoded:
    """What bytes that decoded as an image are."""

    content_type: str
    """Detected from the bytes, not anyone's claim."""
    width: int
    height: int


# Signatures of the formats accepted, and the Pillow format each must then decode as.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)


def sniff(data: bytes) -> str | None:
    """The Pillow format name the first bytes announce, or None."""
    for magic, offset, image_format in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (image_format != "WEBP" or data[:4] == b"RIFF"):
            return image_format
    return None


def inspect(data: bytes, max_pixels: int) -> Decoded:
    """The image these bytes are, or FetchFailure(not_an_image | too_large). CPU-bound: in the
    event loop, use `inspect_async`."""
    announced = sniff(data)
    if announced is None:
        raise FetchFailure(NOT_AN_IMAGE, "the bytes are not an image of a supported format")
    try:
        with PilImage.open(io.BytesIO(data), formats=[announced]) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise FetchFailure(TOO_LARGE, f"the image is {width}x{height} pixels, more than allowed")
            probe.verify()
        with PilImage.open(io.BytesIO(data), formats=[announced]) as decoded:
            decoded.load()  # verify() misses truncated JPEG and more; decoding everything does not
            content_type = PilImage.MIME.get(decoded.format or announced, "application/octet-stream")
    except (PilImage.DecompressionBombError, PilImage.DecompressionBombWarning):
        # Pillow's own pixel limit (a warning when warnings are errors, an error beyond twice it).
        raise FetchFailure(TOO_LARGE, "the image has more pixels than allowed") from None
    except FetchFailure:
        raise
    except Exception as exc:
        # Pillow reports broken data as many kinds of error (OSError, SyntaxError, ValueError, ...).
        message = f"the bytes do not decode as {announced} ({type(exc).__name__})"
        raise FetchFailure(NOT_AN_IMAGE, message) from None
    return Decoded(content_type, width, height)


async def inspect_async(data: bytes, max_pixels: int) -> Decoded:
    """`inspect` in a worker thread, so decoding does not stall the event loop."""
    return await asyncio.to_thread(inspect, data, max_pixels)
