"""gRPC server bootstrap shared by every service: the service token, error mapping, tracing, health,
reflection, drain.

`create_server` builds a server without starting it (tests use the same object on port 0);
`start` binds and starts it, `drain` stops it gracefully.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.grpc_calls import ServerInterceptor

log = logging.getLogger(__name__)

# Keepalive pings let clients notice a dead server quickly; large messages carry images.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Clients reconnect now and then, and so find pods added since they first connected. No
    # grace limit: streams open at that moment (a Watch of a long video) run to their end.
    ("grpc.max_connection_age_ms", 5 * 60_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass
class ServerHandle:
    """A built (not yet started) server and its health servicer."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: Sequence[str]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)


def create_server(service_names: Sequence[str], *, token: str | None) -> ServerHandle:
    """A grpc.aio server with error mapping, tracing, health and reflection; add servicers, bind, start.

    With a `token`, every call but health and reflection must carry it (`shared.service_auth`);
    None (settings made in code, for tests) serves every caller. No default: a server is never
    left open by an argument forgotten."""
    server = grpc.aio.server(interceptors=[ServerInterceptor(token)], options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return ServerHandle(server, health_servicer, service_names)


async def start(handle: ServerHandle, listen: str) -> int:
    """Binds and starts the server; returns the bound port (useful with port 0)."""
    port = handle.server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await handle.server.start()
    await handle.set_serving(True)
    return port


async def drain(handle: ServerHandle, grace_s: float) -> None:
    """Stops taking calls (health NOT_SERVING first, so balancers look elsewhere) and gives the
    calls in flight up to `grace_s` seconds to finish."""
    log.info("draining", extra={"grace_s": grace_s})
    await handle.set_serving(False)
    await handle.server.stop(grace_s)
