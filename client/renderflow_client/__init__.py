"""Renderflow's Python client: submit renders, follow them live, wait with a timeout that always
ends, download their outputs; `Renderflow` blocks, `AsyncRenderflow` is for asyncio. The `rf`
command is built on it."""

__version__ = "0.1.0"

from renderflow_client.aio import AsyncRenderflow
from renderflow_client.errors import (
    ApiError,
    AuthenticationError,
    ConflictError,
    ConnectionFailed,
    FieldError,
    GoneError,
    NotFoundError,
    RateLimitedError,
    RenderFailed,
    RenderflowError,
    UnavailableError,
    ValidationError,
    WaitTimeout,
)
from renderflow_client.models import Batch, Output, Render, RenderEvent, Upload
from renderflow_client.sync import Renderflow
from renderflow_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "ApiError",
    "AsyncRenderflow",
    "AuthenticationError",
    "Batch",
    "ConflictError",
    "ConnectionFailed",
    "FieldError",
    "GoneError",
    "NotFoundError",
    "Output",
    "RateLimitedError",
    "Render",
    "RenderEvent",
    "RenderFailed",
    "Renderflow",
    "RenderflowError",
    "UnavailableError",
    "Upload",
    "ValidationError",
    "WaitTimeout",
    "WebhookVerificationError",
    "verify_webhook",
]
