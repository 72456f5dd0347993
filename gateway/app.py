"""The gateway application: `create_app` builds it (tests build the very same one), `running` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from opentelemetry import trace

from gateway.auth import AUTHENTICATOR, Authenticator, auth_middleware
from gateway.clients import Clients, open_clients
from gateway.config import Settings
from gateway.limits import add_rate_limit_headers, rate_limit_middleware, rate_limits_context
from gateway.problems import add_common_headers, problem_middleware
from gateway.routes import (
    batches,
    docs,
    events,
    health,
    metrics,
    output,
    projects,
    renders,
    rules,
    uploads,
    webhooks,
)
from gateway.slow_clients import ConnectionCaps, body_deadline_middleware, quiet_accept_errors
from gateway.state import CLIENTS, SETTINGS
from gateway.streams import OPEN_STREAMS, OpenStreams
from gateway.tracing import tracing_middleware
from gateway.validation import prepare_validators
from gateway.watch_hub import end_watches, watch_hub_context

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]
MAX_REQUEST_LINE_BYTES = 32 * 1024


def _clients_context(given: Clients | None) -> CleanupContext:
    async def clients_context(app: web.Application) -> AsyncIterator[None]:
        if given is not None:  # the caller's: it opened them, it closes them
            app[CLIENTS] = given
            yield
            return
        async with open_clients(app[SETTINGS]) as opened:
            app[CLIENTS] = opened
            yield

    return clients_context


async def _auth_context(app: web.Application) -> AsyncIterator[None]:
    authenticator = Authenticator(app[CLIENTS].metadata, app[SETTINGS].auth_cache_ttl_s)
    app[AUTHENTICATOR] = authenticator
    # A revoked key's open streams end with it (its cached answers are already gone).
    authenticator.on_revoked(lambda key_id, user_id: app[OPEN_STREAMS].end(key_id=key_id, user_id=user_id))
    follower = asyncio.create_task(authenticator.follow_changes(), name="auth-change-feed")
    try:
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await authenticator.close()


async def _end_event_streams(app: web.Application) -> None:
    # Event streams never end by themselves; end them so that shutdown need not wait out the grace
    # period. Clients reconnect (to another instance) with Last-Event-ID and miss nothing.
    app[OPEN_STREAMS].end_all()


def create_app(
    settings: Settings,
    clients: Clients | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
) -> web.Application:
    """The gateway, not yet started. Without `clients`, it opens (and closes) its own channels;
    without `tracer_provider`, spans go to the global one."""
    app = web.Application(
        middlewares=[
            body_deadline_middleware,
            tracing_middleware(tracer_provider),
            problem_middleware,
            metrics.observe_middleware,
            auth_middleware,
            rate_limit_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[OPEN_STREAMS] = OpenStreams(settings.max_streams_per_key)
    app.on_response_prepare.append(add_common_headers)
    app.on_response_prepare.append(add_rate_limit_headers)
    prepare_validators()
    app.on_shutdown.append(_end_event_streams)
    app.on_shutdown.append(end_watches)
    app.cleanup_ctx.append(_clients_context(clients))
    app.cleanup_ctx.append(_auth_context)
    app.cleanup_ctx.append(rate_limits_context)
    app.cleanup_ctx.append(watch_hub_context)
    modules = (health, docs, metrics, projects, rules, webhooks, uploads, renders, batches, events, output)
    for module in modules:
        app.add_routes(module.routes)
    return app


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    clients: Clients | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
) -> AsyncIterator[int]:
    """Serves the gateway on `settings.host:settings.port`; yields the bound port (useful with port 0)
    and, on exit, stops taking connections and gives requests in flight the grace period."""
    app = create_app(settings, clients, tracer_provider=tracer_provider)
    # Cancelling the handler of a client that went away is what frees its upstream streams at once.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        # Room for every query string the spec allows (a 1 KiB page token of 4-byte characters,
        # percent-encoded): past aiohttp's 8 KiB default its parser answers a bare text/plain 400.
        max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=MAX_REQUEST_LINE_BYTES,
        # aiohttp's keep-alive timer is a request-head deadline: it starts when a connection opens
        # and again when a response has gone out, partial data does not reset it, and it closes the
        # connection unless a whole head has arrived. (So idle kept-alive connections close after as
        # long: a proxy in front should drop its idle upstream connections sooner.)
        keepalive_timeout=settings.header_timeout_s,
    )
    with quiet_accept_errors(asyncio.get_running_loop()):
        await runner.setup()
        assert runner.server is not None
        ConnectionCaps(settings.max_connections, settings.max_connections_per_client).watch(runner.server)
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            port: int = runner.addresses[0][1]
            log.info("gateway listening", extra={"url": f"http://{settings.host}:{port}"})
            yield port
        finally:
            await runner.cleanup()
