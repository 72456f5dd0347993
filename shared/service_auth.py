"""The service token: every call to a Renderflow gRPC service must carry it, as the metadata
`authorization: Bearer <RENDERFLOW_SERVICE_TOKEN>`.

The services trust the user id inside each request, so who may call them at all is what keeps one
user's renders and keys from another: a process that reaches a service port without the token can
call nothing but the exempt services below. Servers check it and clients attach it in the
interceptors of `shared.grpc_calls`.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from shared.errors import RenderflowError

METADATA_KEY = "authorization"
TOKEN_PREFIX = "rfsvc_"
EXEMPT = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
"""Services callable without the token: the health check (probes and the supervisor hold no
token) and server reflection, which describes the schema and cannot call anything."""


def new_service_token() -> str:
    """A random token (its prefix lets the test suite find one written where it must not be)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class ServiceTokenRefused(RenderflowError):
    """The call does not carry the service token."""

    # UNAUTHENTICATED to any gRPC caller; but with the code `internal`, Renderflow's own clients
    # (`shared.rpc_errors`) take it for a fault of the deployment, which the gateway answers with
    # a logged 500, never a 401 telling an end user that their API key is wrong.
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class TokenCheck:
    """Whether a call may be served: it carries the token, or calls an exempt service."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def refusal(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> ServiceTokenRefused | None:
        """None when the call of `method` (`/package.Service/Method`) may go on; else why not."""
        if method.split("/")[1] in EXEMPT:
            return None
        shown = presented(metadata)
        if shown is not None and hmac.compare_digest(shown.encode(), self._expected):
            return None
        if shown is None:
            return ServiceTokenRefused(
                f"missing service token: send the metadata '{METADATA_KEY}: Bearer <token>'"
            )
        return ServiceTokenRefused(
            "wrong service token: it is not this deployment's RENDERFLOW_SERVICE_TOKEN"
        )


def bearer(token: str) -> str:
    """The metadata value that carries `token`."""
    return f"Bearer {token}"


def presented(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` value a call came with, or None."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value if isinstance(value, str) else ""
    return None
