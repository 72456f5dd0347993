"""What the generation service accepts as an upload, and for how long it keeps one."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Env


@dataclass(frozen=True)
class UploadSettings:
    """Limits of uploads."""

    max_bytes: int = 25 * 1024 * 1024
    """RENDERFLOW_UPLOAD_MAX_BYTES: the largest upload accepted (413 past it)."""
    max_pixels: int = 64_000_000
    """RENDERFLOW_UPLOAD_MAX_PIXELS: the most pixels an uploaded image may have (checked before it is
    decoded: a small file cannot unpack into gigabytes)."""
    ttl_s: float = 86400.0
    """RENDERFLOW_UPLOAD_TTL_S: how long an upload is kept (and may be named by renders) after it is
    made; then its bytes and record are deleted."""

    @classmethod
    def from_env(cls, env: Env) -> UploadSettings:
        return cls(
            max_bytes=env.int("RENDERFLOW_UPLOAD_MAX_BYTES", cls.max_bytes, minimum=1),
            max_pixels=env.int("RENDERFLOW_UPLOAD_MAX_PIXELS", cls.max_pixels, minimum=1),
            ttl_s=env.float("RENDERFLOW_UPLOAD_TTL_S", cls.ttl_s, minimum=1.0),
        )
