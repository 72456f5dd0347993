"""HTTP routes by resource; handlers only translate between HTTP and the service clients."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from aiohttp import web

from gateway.clients import Clients
from gateway.state import CLIENTS, TIMER
from gateway.validation import read_json, read_query
from shared.contract import Timed

# Ids in paths never hold a slash or a colon: `/v1/renders/{id}:cancel` stays unambiguous.
ID = "{id:[^/:]+}"


def clients(request: web.Request) -> Clients:
    """The service clients of the application serving `request`."""
    return request.app[CLIENTS]


def phase(request: web.Request, name: Timed) -> AbstractContextManager[None]:
    """Times a block of the request as phase `name` (db, enqueue, ...)."""
    return request[TIMER].phase(name)


async def body(request: web.Request, schema_name: str) -> dict[str, Any]:
    """The validated JSON body (the `validation` phase)."""
    with phase(request, "validation"):
        return await read_json(request, schema_name)


def query(request: web.Request, operation_id: str) -> dict[str, Any]:
    """The validated query parameters of `operation_id` (the `validation` phase)."""
    with phase(request, "validation"):
        return read_query(request, operation_id)


def page_args(params: dict[str, Any]) -> tuple[int, str]:
    """`page_size` (0 = the service's default) and `page_token` of validated query parameters."""
    return int(params.get("page_size", 0)), str(params.get("page_token", ""))
