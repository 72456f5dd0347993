"""The artifact store: render outputs named by render id, written atomically, read in ranges.

Naming by render id makes a second write of the same render (a job that ran twice) harmless:
it replaces the file with equal bytes in one rename.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, Self

from services.generation.validation import is_valid_id
from shared.errors import NotFound, ValidationFailed

CHUNK = 64 * 1024
COPY_CHUNK = 1024 * 1024
UPLOADS = "uploads"
"""The scope of the store (`scoped`) that holds uploads, beside the outputs."""


@dataclass(frozen=True)
class StoredArtifact:
    """What was stored for a render."""

    size: int
    sha256: str


class ArtifactStore(Protocol):
    """Where outputs live. Writes are atomic; a repeated write of a render replaces it whole."""

    async def put(
        self, render_id: str, data: bytes | Path, content_type: str | None = None
    ) -> StoredArtifact:
        """Stores `data`, or the file it names (read a piece at a time, never whole), as the
        render's output (`content_type`: what a direct download says)."""
        ...

    async def size(self, render_id: str) -> int:
        """The size of the render's output; NotFound when there is none."""
        ...

    def read(self, render_id: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The bytes from `offset`, `length` of them (0 = to the end), in chunks of 64 KiB."""
        ...

    async def get(self, render_id: str) -> bytes:
        """The whole output of a render."""
        ...

    async def delete(self, render_id: str) -> None:
        """Deletes the render's output, if it is there."""
        ...

    def local_copy(self, render_id: str) -> AbstractAsyncContextManager[Path]:
        """A file holding the render's output for the block, for readers that need a file (ffmpeg
        seeking in a video); NotFound when there is none."""
        ...

    async def presigned_url(
        self, render_id: str, expires_s: float | None = None
    ) -> tuple[str, datetime] | None:
        """A URL that fetches the output from the store itself without credentials, and until
        when; None from a store that cannot give one (the local directory)."""
        ...

    def scoped(self, name: str) -> Self:
        """A store of another kind of file (`uploads`) beside this one's, on the same client."""
        ...

    async def close(self) -> None:
        """Lets go of what the store holds open."""
        ...


class LocalArtifactStore:
    """Artifacts as files in one directory, fanned out by the id's first two characters."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def path(self, render_id: str) -> Path:
        """The file of a render's output (ids are checked so they cannot leave the root)."""
        if not is_valid_id(render_id):
            raise ValueError(f"not a render id: {render_id!r}")
        return self._root / render_id[:2] / render_id

    async def put(
        self, render_id: str, data: bytes | Path, content_type: str | None = None
    ) -> StoredArtifact:
        return await asyncio.to_thread(self._put, self.path(render_id), data)

    @asynccontextmanager
    async def local_copy(self, render_id: str) -> AsyncIterator[Path]:
        await self.size(render_id)  # NotFound when there is none
        yield self.path(render_id)

    async def presigned_url(self, render_id: str, expires_s: float | None = None) -> None:
        return None

    def scoped(self, name: str) -> LocalArtifactStore:
        return LocalArtifactStore(self._root / name)

    async def close(self) -> None:
        return None

    async def delete(self, render_id: str) -> None:
        await asyncio.to_thread(self.path(render_id).unlink, missing_ok=True)

    @staticmethod
    def _put(path: Path, data: bytes | Path) -> StoredArtifact:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as file:
                for piece in _pieces(data):
                    digest.update(piece)
                    file.write(piece)
                    size += len(piece)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        # The rename itself must survive a crash too.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return StoredArtifact(size, digest.hexdigest())

    async def size(self, render_id: str) -> int:
        try:
            return (await asyncio.to_thread(self.path(render_id).stat)).st_size
        except FileNotFoundError:
            raise NotFound(f"render {render_id} has no stored output") from None

    async def read(self, render_id: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        if offset < 0 or length < 0:
            raise ValidationFailed.field("offset" if offset < 0 else "length", "must not be negative")
        total = await self.size(render_id)
        end = total if length == 0 else min(total, offset + length)
        if offset > total:
            raise ValidationFailed.field("offset", f"is beyond the end ({total} bytes)")
        file = await asyncio.to_thread(open, self.path(render_id), "rb")
        try:
            await asyncio.to_thread(file.seek, offset)
            position = offset
            while position < end:
                chunk = await asyncio.to_thread(file.read, min(CHUNK, end - position))
                if not chunk:
                    break
                position += len(chunk)
                yield chunk
        finally:
            file.close()

    async def get(self, render_id: str) -> bytes:
        """The whole output of a render (for references)."""
        return b"".join([chunk async for chunk in self.read(render_id)])


def _pieces(data: bytes | Path) -> Iterator[bytes | memoryview]:
    """`data` whole, or the file it names a MiB at a time."""
    if isinstance(data, bytes):
        yield data
        return
    with data.open("rb") as file:
        while piece := file.read(COPY_CHUNK):
            yield piece
