"""Uploads as the generation service offers them: made from a client's bytes once they decode as an
image, read and deleted by their user alone, swept when they expire."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterable, Sequence

from services.generation.artifacts import ArtifactStore
from services.generation.uploads.settings import UploadSettings
from services.generation.uploads.store import Upload, UploadStore
from shared.errors import FieldError, PayloadTooLarge, Unavailable, ValidationFailed
from shared.images import inspect_async
from shared.url_guard import FetchFailure

log = logging.getLogger(__name__)


class Uploads:
    """The uploads API over their records and their files (the artifact store's `uploads`)."""

    def __init__(self, store: UploadStore, files: ArtifactStore, settings: UploadSettings) -> None:
        self._store = store
        self._files = files
        self._settings = settings

    async def create(self, user_id: str, chunks: AsyncIterable[bytes]) -> Upload:
        """An upload of the bytes of `chunks`: PayloadTooLarge past the cap (as soon as it is
        passed), ValidationFailed (field `file`) when they are not an image of a supported format.
        The type is the one the bytes decode as, whatever the client called them."""
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > self._settings.max_bytes:
                raise PayloadTooLarge(f"an upload may be at most {self._settings.max_bytes} bytes")
        if not data:
            raise ValidationFailed.field("file", "is empty")
        body = bytes(data)
        try:
            decoded = await inspect_async(body, self._settings.max_pixels)
        except FetchFailure as exc:
            raise ValidationFailed.field("file", exc.message) from None
        upload_id = str(uuid.uuid4())
        stored = await self._files.put(upload_id, body, decoded.content_type)
        try:
            return await self._store.insert(user_id, upload_id, decoded, stored, self._settings.ttl_s)
        except BaseException:
            with contextlib.suppress(Exception):  # left behind otherwise: unnamed, but never read
                await self._files.delete(upload_id)
            raise

    async def get(self, user_id: str, upload_id: str) -> Upload:
        return await self._store.get(user_id, upload_id)

    async def delete(self, user_id: str, upload_id: str) -> Upload:
        """Deletes the user's upload: its record at once (renders queued with it fail to find it),
        then its bytes."""
        upload = await self._store.delete(user_id, upload_id)
        try:
            await self._files.delete(upload_id)
        except (Unavailable, OSError) as exc:
            # It is deleted for everyone already: its bytes, named by no record, are never read again.
            log.warning(
                "the bytes of a deleted upload stay", extra={"upload_id": upload_id, "error": str(exc)}
            )
        return upload

    async def check_named(self, user_id: str, upload_ids: Sequence[str], fields: Sequence[str]) -> None:
        """ValidationFailed naming each of `fields` whose upload (the same index of `upload_ids`) is
        not one of the user's, or has expired: a render names only uploads it can have."""
        live = await self._store.live(user_id, upload_ids)
        missing = [f for f, upload_id in zip(fields, upload_ids, strict=True) if upload_id not in live]
        if missing:
            message = "no such upload (or it expired)"
            raise ValidationFailed(
                f"{', '.join(missing)}: {message}", [FieldError(field, message) for field in missing]
            )

    async def sweep(self) -> int:
        """Deletes a batch of expired uploads, bytes first; returns how many."""
        return await self._store.sweep(self._files.delete)
