"""A render's events, live, as Server-Sent Events and over WebSocket: replay after the last event id,
live tail, heartbeats, and the end of the stream after the terminal event. Both are fed by the
watch hub, so any number of watchers of a render cost one upstream Watch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from aiohttp import WSCloseCode, web
from renderflow.v1 import generation_pb2

from gateway.auth import principal, websocket_bearer_protocol
from gateway.routes import ID, clients, phase, query
from gateway.sse import CONTENT_TYPE, comment_frame, event_frame, retry_frame, with_heartbeats
from gateway.state import SETTINGS, TIMER
from gateway.streams import OPEN_STREAMS, Ending, EndStream
from gateway.watch_hub import WATCH_HUB
from shared.contract import TERMINAL
from shared.errors import RenderflowError, ValidationFailed
from shared.render_json import event_json
from shared.spans import mark_stream

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

RECONNECT_MS = 1000
_SEQ = re.compile("[0-9]{1,18}")
WS_SENDER_TASK = "ws-sender"
"""The name of the task that sends a WebSocket's events (one per connection)."""

Events = AsyncGenerator[generation_pb2.RenderEvent, None]


def resume_point(request: web.Request, operation_id: str) -> tuple[str, str]:
    """Where a stream resumes, as the client sent it: the `Last-Event-ID` header, else the
    `last_event_id` parameter ("" for neither); and which of the two it was, for errors."""
    params = query(request, operation_id)
    header = request.headers.get("Last-Event-ID")
    if header:
        return header, "Last-Event-ID"
    return str(params.get("last_event_id", "")), "last_event_id"


def after_seq(request: web.Request, operation_id: str) -> int:
    """The seq a render's stream resumes after (0: from its first event)."""
    text, field = resume_point(request, operation_id)
    if not text:
        return 0
    # ASCII digits only (str.isdigit also admits `³`, which int() refuses), and few enough of
    # them for int() and for the int64 the Watch call carries.
    if not _SEQ.fullmatch(text):
        raise ValidationFailed.field(field, "must be a non-negative integer of at most 18 digits")
    return int(text)


async def _watch(request: web.Request, operation_id: str) -> Events:
    user = principal(request)
    render_id = request.match_info["id"]
    request[TIMER].annotate({"render.id": render_id})
    after = after_seq(request, operation_id)
    with phase(request, "db"):
        # Unknown or not yours: 404 before the stream starts.
        await clients(request).generation.get_render(user.user_id, render_id, brief=True)
    return request.app[WATCH_HUB].watch(user.user_id, render_id, after)


@routes.get(f"/v1/renders/{ID}/events", allow_head=False)
async def render_events(request: web.Request) -> web.StreamResponse:
    return await stream_events(request, await _watch(request, "watchRender"), ids=_by_seq)


def _by_seq(event: generation_pb2.RenderEvent) -> str:
    return str(event.seq)


def _cancel_current_task() -> EndStream:
    task = asyncio.current_task()
    assert task is not None  # handlers run in tasks
    # Cancelling the handler ends the response at once; the client reconnects with its last event
    # id (to another gateway on shutdown; a revoked key then gets 401).
    return lambda _why: task.cancel()


async def stream_events(
    request: web.Request, events: Events, *, ids: Callable[[generation_pb2.RenderEvent], str]
) -> web.StreamResponse:
    """Serves `events` as Server-Sent Events (`id:` = `ids(event)`, where a client resumes) with
    heartbeats, until the source ends; closes the source when the client goes away."""
    mark_stream()
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = CONTENT_TYPE
    heartbeat_s = request.app[SETTINGS].sse_heartbeat_s
    streams = request.app[OPEN_STREAMS]
    async with contextlib.aclosing(events):
        with streams.opened(principal(request), _cancel_current_task()):  # over the cap: 429 here
            await response.prepare(request)
            await response.write(retry_frame(RECONNECT_MS))
            try:
                async with contextlib.aclosing(with_heartbeats(events, heartbeat_s)) as items:
                    async for event in items:
                        if event is None:
                            await response.write(comment_frame())
                            continue
                        await response.write(event_frame(ids(event), event.type, event_json(event)))
                await response.write_eof()
            except RenderflowError as exc:
                # The status line has gone out: end the stream; the client resumes from its last event id.
                log.warning("event stream interrupted", extra={"path": request.path, "code": exc.code})
            except ConnectionResetError:
                pass  # the client went away
    return response


@routes.get(f"/v1/renders/{ID}/ws", allow_head=False)
async def render_websocket(request: web.Request) -> web.WebSocketResponse:
    events = await _watch(request, "watchRenderWebSocket")
    mark_stream()
    # The client's own spelling of `bearer` (auth accepts any case): aiohttp matches subprotocols
    # exactly, and logs every offered one, the key included, when none matches.
    offered = websocket_bearer_protocol(request)
    socket = web.WebSocketResponse(
        protocols=(offered,) if offered else (), heartbeat=request.app[SETTINGS].sse_heartbeat_s
    )
    with request.app[OPEN_STREAMS].opened(principal(request), functools.partial(_close_websocket, socket)):
        async with contextlib.aclosing(events):
            await socket.prepare(request)  # not a WebSocket handshake: 400, as a problem
            ending = asyncio.Event()
            sender = asyncio.create_task(_send_events(socket, events, ending), name=WS_SENDER_TASK)
            try:
                # On shutdown the hub ends the watch, and the sender closes with 1012: resume elsewhere.
                async for _message in socket:
                    pass  # clients have nothing to say; reading is what notices that they close
            finally:
                if ending.is_set():
                    await sender  # it is closing the socket: let the closing handshake finish
                else:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
    return socket


def _offered_protocols_unlogged(record: logging.LogRecord) -> bool:
    # aiohttp warns of a handshake whose subprotocols match none of ours, listing what the client
    # offered: a key, for a client that put it there in some form we do not take.
    return not str(record.msg).startswith("%s: Client protocols")


logging.getLogger("aiohttp.websocket").addFilter(_offered_protocols_unlogged)

_CLOSE_CODES = {Ending.REVOKED: WSCloseCode.POLICY_VIOLATION, Ending.SHUTDOWN: WSCloseCode.SERVICE_RESTART}


def _close_websocket(socket: web.WebSocketResponse, why: Ending) -> None:
    # Closing ends the handler's read loop, which stops the sender.
    task = asyncio.create_task(socket.close(code=_CLOSE_CODES[why], message=why.value.encode()))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Task[bool]] = set()
"""Closing handshakes under way (the loop keeps only weak references to tasks)."""


async def _send_events(
    socket: web.WebSocketResponse, events: AsyncIterator[generation_pb2.RenderEvent], ending: asyncio.Event
) -> None:
    """Sends each event as a JSON text message; after the terminal one closes normally (1000), after
    an interruption with 1012 (service restart) or 1013 (try again later): resume with
    `last_event_id`."""
    code = WSCloseCode.SERVICE_RESTART
    try:
        async for event in events:
            await socket.send_str(json.dumps(event_json(event), separators=(",", ":")))
            if event.type in TERMINAL:
                code = WSCloseCode.OK
    except RenderflowError as exc:
        log.warning("websocket event stream interrupted", extra={"code": exc.code})
        code = WSCloseCode.TRY_AGAIN_LATER
    except ConnectionResetError:
        return
    ending.set()
    await socket.close(code=code)
