"""A render's events as Server-Sent Events: replay after Last-Event-ID, live tail, heartbeats,
and the end of the stream after the terminal event."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from gateway.auth import principal
from gateway.resources import TERMINAL_EVENTS, event_json
from gateway.routes import ID, clients, phase, query
from gateway.sse import CONTENT_TYPE, comment_frame, event_frame, retry_frame, with_heartbeats
from gateway.state import EVENT_STREAMS, SETTINGS
from shared.errors import RenderflowError, ValidationFailed

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

RECONNECT_MS = 1000


def after_seq(request: web.Request) -> int:
    """Where the stream resumes: the `Last-Event-ID` header, else `last_event_id`, else 0."""
    params = query(request, "watchRender")
    header = request.headers.get("Last-Event-ID")
    if header is None or header == "":
        return int(params.get("last_event_id", 0))
    if not header.isdigit():
        raise ValidationFailed.field("Last-Event-ID", "must be a non-negative integer")
    return int(header)


@routes.get(f"/v1/renders/{ID}/events", allow_head=False)
async def render_events(request: web.Request) -> web.StreamResponse:
    user = principal(request)
    render_id = request.match_info["id"]
    after = after_seq(request)
    generation = clients(request).generation
    with phase(request, "db"):
        await generation.get_render(user.user_id, render_id)  # unknown or not yours: 404 before streaming
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = CONTENT_TYPE
    await response.prepare(request)
    await response.write(retry_frame(RECONNECT_MS))
    streams = request.app[EVENT_STREAMS]
    task = asyncio.current_task()
    if task is not None:
        streams.add(task)  # on shutdown the gateway ends open streams; clients resume elsewhere
    events = generation.watch(user.user_id, render_id, after)
    heartbeat_s = request.app[SETTINGS].sse_heartbeat_s
    try:
        async with (
            contextlib.aclosing(events),
            contextlib.aclosing(with_heartbeats(events, heartbeat_s)) as items,
        ):
            async for event in items:
                if event is None:
                    await response.write(comment_frame())
                    continue
                await response.write(event_frame(event.seq, event.type, event_json(event)))
                if event.type in TERMINAL_EVENTS:
                    break
        await response.write_eof()
    except RenderflowError as exc:
        # The status line has gone out: end the stream; the client resumes from its last event id.
        log.warning("event stream interrupted", extra={"render_id": render_id, "code": exc.code})
    except ConnectionResetError:
        pass  # the client went away
    finally:
        if task is not None:
            streams.discard(task)
    return response
