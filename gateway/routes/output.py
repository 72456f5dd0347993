"""A finished render's bytes, streamed from the generation service: ETag, If-None-Match, one Range;
or, with an object store and a client that allows it, a redirect to a presigned URL of the store."""

from __future__ import annotations

import contextlib
import mimetypes
import re

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.auth import principal
from gateway.problems import RangeNotSatisfiable
from gateway.routes import ID, clients, phase, query
from shared.errors import FailedPrecondition, Gone
from shared.http_headers import preferences

routes = web.RouteTableDef()

CACHE_CONTROL = "private, max-age=86400"  # an output never changes once written


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The first and last byte of a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range within
    `total` bytes; None to send everything (no range, several, or one that cannot be read: HTTP
    lets a server ignore a Range it does not understand). Raises RangeNotSatisfiable when the
    range starts past the end."""
    if not header or total <= 0:
        return None
    found = _RANGE.fullmatch(header.strip())
    if found is None:
        return None
    first_text, last_text = found.groups()
    if first_text == "":
        if last_text == "":
            return None
        suffix = _position(last_text)
        if suffix == 0:
            raise RangeNotSatisfiable(total)
        return max(0, total - suffix), total - 1
    first = _position(first_text)
    last = _position(last_text) if last_text else total - 1
    if first >= total:
        raise RangeNotSatisfiable(total)
    if last < first:
        return None
    return first, min(last, total - 1)


# One range of ASCII digits (`str.isdigit` would let `³` through to int(), which refuses it).
_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)", re.IGNORECASE)
_FAR = 2**63
"""Any position past every output: what a longer run of digits than int() accepts stands for."""


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else _FAR


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header names `etag` (weak comparison, as for GET)."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


def content_disposition(render_id: str, content_type: str) -> str:
    """`inline`, with a file name a browser's "save as" uses: the render's id and its type's extension."""
    extension = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    return f'inline; filename="{render_id}{extension}"'


@routes.get(f"/v1/renders/{ID}/output")  # and HEAD: the headers of the GET, without the bytes
async def render_output(request: web.Request) -> web.StreamResponse:
    user = principal(request)
    render_id = request.match_info["id"]
    generation = clients(request).generation
    prefers_redirect = "redirect" in preferences(request.headers.getall("Prefer", []))
    allowed = query(request, "getRenderOutput").get("redirect", False) or prefers_redirect
    redirect = allowed and request.method == "GET"  # a presigned URL is signed for GET alone
    with phase(request, "db"):
        render = await generation.get_render(user.user_id, render_id, brief=True, download_url=redirect)
    if render.HasField("output_deleted_at"):
        deleted = render.output_deleted_at.ToJsonString()
        raise Gone(f"The output was deleted at {deleted} (deleted by its user, or past its retention).")
    if render.status != generation_pb2.RENDER_STATUS_SUCCEEDED or not render.HasField("output"):
        status = generation_pb2.RenderStatus.Name(render.status).removeprefix("RENDER_STATUS_").lower()
        raise FailedPrecondition(f"The render has no output (it is {status}).")
    output = render.output
    headers = {
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
        "Content-Disposition": content_disposition(render_id, output.content_type),
    }
    if output.sha256:
        headers["ETag"] = f'"{output.sha256}"'
        if etag_matches(request.headers.get("If-None-Match"), headers["ETag"]):
            return web.Response(status=304, headers=headers)
    if output.download_url:  # asked for, and the store gave one
        redirected = {"Location": output.download_url, "Cache-Control": "private, no-store"}
        if prefers_redirect:
            redirected["Preference-Applied"] = "redirect"
        return web.Response(status=307, headers=redirected)
    if_range = request.headers.get("If-Range")
    wanted = None if if_range and if_range != headers.get("ETag") else request.headers.get("Range")
    byte_range = parse_range(wanted, output.bytes)
    offset, length = (byte_range[0], byte_range[1] - byte_range[0] + 1) if byte_range else (0, 0)
    if byte_range:
        headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{output.bytes}"
    if request.method == "HEAD":  # what the GET would send, from the render alone: no bytes read
        headers["Content-Length"] = str(length if byte_range else output.bytes)
        headers["Content-Type"] = output.content_type
        return web.Response(status=206 if byte_range else 200, headers=headers)
    chunks = generation.get_output(user.user_id, render_id, offset, length)
    async with contextlib.aclosing(chunks):
        first = await anext(chunks, None)  # a failure here is still a problem document
        response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        response.content_type = (first.content_type if first else "") or output.content_type
        response.content_length = (
            length if byte_range else output.bytes or (first.total_bytes if first else 0)
        )
        await response.prepare(request)
        if first is not None:
            await response.write(first.data)
        async for chunk in chunks:
            await response.write(chunk.data)
        await response.write_eof()
    return response
