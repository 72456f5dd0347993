"""Image validation: only bytes that decode count, whatever they were served or uploaded as."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image as PilImage

from shared.images import inspect, sniff
from shared.url_guard import NOT_AN_IMAGE, TOO_LARGE, FetchFailure
from tests.support.origin import png_bytes

MAX_PIXELS = 10_000_000


def _encoded(image_format: str, size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    PilImage.effect_noise(size, 64).convert("RGB").save(out, format=image_format)
    return out.getvalue()


@pytest.mark.parametrize(
    ("image_format", "content_type"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("GIF", "image/gif"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_supported_formats_are_detected_with_their_size(image_format: str, content_type: str) -> None:
    image = inspect(_encoded(image_format), MAX_PIXELS)
    assert (image.content_type, image.width, image.height) == (content_type, 40, 30)


def test_the_type_comes_from_the_bytes_not_the_name() -> None:
    assert sniff(_encoded("JPEG")) == "JPEG"
    assert sniff(b"<!doctype html><html>") is None
    assert sniff(b"RIFF\0\0\0\0WAVEfmt ") is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!doctype html><html><body>hello</body></html>",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # PNG magic, then garbage
        png_bytes(64, 64, noise=True)[:300],  # truncated PNG
        _encoded("JPEG", (200, 200))[:600],  # truncated JPEG: verify() alone would pass it
        _encoded("GIF")[:40],
    ],
    ids=["empty", "html", "png-garbage", "png-truncated", "jpeg-truncated", "gif-truncated"],
)
def test_bytes_that_do_not_decode_are_not_an_image(data: bytes) -> None:
    with pytest.raises(FetchFailure) as caught:
        inspect(data, MAX_PIXELS)
    assert caught.value.reason == NOT_AN_IMAGE
    assert not caught.value.retryable


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (100_000, 100_000)])
def test_too_many_pixels_is_too_large_before_decoding(width: int, height: int) -> None:
    with pytest.raises(FetchFailure) as caught:
        inspect(_png_header_claiming(width, height), MAX_PIXELS)
    assert caught.value.reason == TOO_LARGE
