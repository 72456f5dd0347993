"""Typed keys of what the application and each request carry (the auth module owns its own)."""

from __future__ import annotations

from aiohttp import web

from gateway.clients import Clients
from gateway.config import Settings
from gateway.timing import PhaseTimer

SETTINGS = web.AppKey("settings", Settings)
CLIENTS = web.AppKey("clients", Clients)

REQUEST_ID = web.RequestKey("request_id", str)
TRACEPARENT = web.RequestKey("traceparent", str)
TIMER = web.RequestKey("timer", PhaseTimer)
STARTED_RESPONSE = web.RequestKey("started_response", bool)
