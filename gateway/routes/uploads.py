"""Uploads: an image sent as the raw body or as the `file` field of a form, streamed to generation,
which caps its size, checks that it decodes as an image and keeps it until it expires. Another
user's upload is a 404."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.auth import principal
from gateway.problems import BadRequest
from gateway.resources import json_response, upload_json
from gateway.routes import ID, clients, phase
from shared.errors import ValidationFailed

routes = web.RouteTableDef()

CHUNK = 256 * 1024
FORM_FIELD = "file"


@routes.post("/v1/uploads")
async def create_upload(request: web.Request) -> web.Response:
    user = principal(request)
    data = await _form_file(request) if request.content_type == "multipart/form-data" else _body(request)
    with phase(request, "db"):
        upload = await clients(request).generation.create_upload(user.user_id, data)
    return json_response(upload_json(upload), status=201, headers={"Location": f"/v1/uploads/{upload.id}"})


@routes.get(f"/v1/uploads/{ID}")
async def get_upload(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        upload = await clients(request).generation.get_upload(user.user_id, request.match_info["id"])
    return json_response(upload_json(upload))


@routes.delete(f"/v1/uploads/{ID}")
async def delete_upload(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        upload = await clients(request).generation.delete_upload(user.user_id, request.match_info["id"])
    return json_response(upload_json(upload))


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


async def _form_file(request: web.Request) -> AsyncIterator[bytes]:
    """The bytes of the form's `file` field (the parts before it skipped, those after it unread)."""
    with _malformed_form():
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == FORM_FIELD:
                return _part(part)
    raise ValidationFailed.field(FORM_FIELD, "is missing: send the image as the form's `file` field")


async def _part(part: BodyPartReader) -> AsyncIterator[bytes]:
    with _malformed_form():
        while chunk := await part.read_chunk(CHUNK):
            yield chunk


@contextmanager
def _malformed_form() -> Iterator[None]:
    """aiohttp's complaints about a multipart body as a 400."""
    try:
        yield
    except (ValueError, HttpProcessingError) as exc:
        raise BadRequest(f"The form cannot be read ({type(exc).__name__}).") from None
