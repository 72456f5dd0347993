"""Reference images for renders: fetched through the imagefetch service, or read from another
render's output or from an upload. This module is the worker's gRPC edge towards imagefetch.

A render's output that is a video stands as a reference by its last frame (as PNG): a chain goes
on from where the render before it ended, and any render named as a reference is read the same
way. The frame is decoded by ffmpeg, which reads only the end of the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.generation.artifacts import UPLOADS, ArtifactStore
from services.generation.backends import BackendError
from services.generation.backends.video import last_frame
from services.generation.domain import Render
from services.generation.outages import waiting_out
from services.generation.protocols import RenderSource
from shared.errors import NotFound, RenderflowError, Unavailable
from shared.rpc_errors import rpc_errors

log = logging.getLogger(__name__)


class ReferenceFailed(Exception):
    """The reference could not be had. `reason` as imagefetch names it (timeout, http_404, ...);
    `transient` when the cause is our own plumbing (imagefetch down), worth another attempt;
    `source_render_id`: the render whose output it was to be, when known."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        transient: bool = False,
        source_render_id: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.transient = transient
        self.source_render_id = source_render_id


@dataclass(frozen=True)
class Resolved:
    """A reference image, the render it came from (none for a URL) and what is worth saying of it."""

    data: bytes
    source_render_id: str = ""
    note: str = ""


class References:
    """Resolves a render's reference to image bytes."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        renders: RenderSource,
        artifacts: ArtifactStore,
        timeout_s: float,
        outage_s: float = 0.0,
    ) -> None:
        self._stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        self._renders = renders
        self._artifacts = artifacts
        self._uploads = artifacts.scoped(UPLOADS)
        self._timeout_s = timeout_s
        self._outage_s = outage_s

    async def resolve(self, render: Render) -> Resolved:
        """The reference image of `render` (which must have one); ReferenceFailed when it cannot
        be had."""
        reference = render.reference
        assert reference is not None
        if reference.url:
            return Resolved(await self._fetch(reference.url))
        if reference.render_id:
            data, what = await self._output_of(render.user_id, reference.render_id)
            return Resolved(data, reference.render_id, f"reference: {what} of {reference.render_id}")
        if reference.upload_id:
            return Resolved(
                await self._upload(reference.upload_id), note=f"reference: upload {reference.upload_id}"
            )
        before = await self._renders.continues_from(render.user_id, render.chain_id, render.position)
        if before is None:
            message = f"no render before position {render.position} of chain {render.chain_id} has succeeded"
            raise ReferenceFailed("nothing_to_continue", message)
        data, what = await self._output_of(render.user_id, before.id)
        note = f"reference: {what} of {before.id}, position {before.position} of the chain"
        return Resolved(data, before.id, note)

    async def _fetch(self, url: str) -> bytes:
        request = imagefetch_pb2.FetchRequest(url=url, deadline_ms=int(self._timeout_s * 1000))
        try:
            async for attempt in waiting_out(self._outage_s, "image-fetch service"):
                with attempt, rpc_errors():
                    # A little slack over the fetch's own deadline, so its typed timeout wins.
                    result = await self._stub.Fetch(request, timeout=self._timeout_s + 1.0)
        except Unavailable as exc:  # also DeadlineExceeded
            raise ReferenceFailed(
                "unavailable",
                f"the image-fetch service failed: {exc.message}",
                retryable=True,
                transient=True,
            ) from exc
        except RenderflowError as exc:
            raise ReferenceFailed("invalid_url", exc.message) from exc
        # On the worker's image_fetch span, so that its trace alone tells a cached reference.
        trace.get_current_span().set_attributes(
            {"imagefetch.cache_hit": result.cache_hit, "imagefetch.attempts": result.attempts}
        )
        if result.WhichOneof("outcome") == "failure":
            failure = result.failure
            raise ReferenceFailed(failure.reason, failure.message, retryable=failure.retryable)
        return result.image.data

    async def _upload(self, upload_id: str) -> bytes:
        """An upload's bytes (whose owner the submit checked); `not_found` once it expired or was
        deleted."""
        try:
            return await self._uploads.get(upload_id)
        except NotFound:
            raise ReferenceFailed("not_found", f"upload {upload_id} is gone (expired or deleted)") from None
        except (OSError, Unavailable) as exc:
            raise ReferenceFailed("unavailable", "the artifact store failed", transient=True) from exc

    async def _output_of(self, user_id: str, render_id: str) -> tuple[bytes, str]:
        """A render's output as a reference image, and what of it that is (the output, or the
        last frame of a video)."""
        try:
            return await self._read_output(user_id, render_id)
        except ReferenceFailed as exc:
            exc.source_render_id = render_id
            raise

    async def _read_output(self, user_id: str, render_id: str) -> tuple[bytes, str]:
        try:
            source = await self._renders.get(user_id, render_id)
        except NotFound:
            raise ReferenceFailed("not_found", f"render {render_id} not found") from None
        if source.status != "succeeded" or source.output is None:
            retryable = not source.terminal
            raise ReferenceFailed(
                "not_ready", f"render {render_id} has no output ({source.status})", retryable=retryable
            )
        video = source.output.content_type.startswith("video/")
        try:
            if video:
                async with self._artifacts.local_copy(render_id) as path:  # NotFound when it is gone
                    frame = await last_frame(path)
                return frame, "the last frame"
            return await self._artifacts.get(render_id), "the output"
        except NotFound:
            raise ReferenceFailed("not_found", f"the output of render {render_id} is missing") from None
        except BackendError as exc:
            raise ReferenceFailed(exc.reason, f"the last frame of render {render_id}: {exc}") from exc
        except (OSError, Unavailable) as exc:
            raise ReferenceFailed("unavailable", "the artifact store failed", transient=True) from exc
