"""gRPC channels to Renderflow services: the service token, tracing, keepalive, and retries of
transient failures.

Callers wrap calls in `shared.rpc_errors.rpc_errors()` so that they only ever see domain errors.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from shared.grpc_calls import ServiceChannel
from shared.metrics import SCOPE

# Retry transient transport failures (peer restarting, connection reset, a server draining or not
# serving) a few times with backoff. gRPC retries any attempt that ends UNAVAILABLE before the
# answer's headers, a handler's own UNAVAILABLE included: handlers say theirs with a pushback of -1
# (shared.grpc_calls.NO_RETRY), which forbids it, so only calls that did no work are run again.
# Application-level retries are the caller's business.
_SERVICE_CONFIG = {
    # Spread calls over every address the name resolves to (one per pod behind a headless Service).
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 3,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    # Reconnect fast after a peer restarts instead of backing off for up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def create_channel(target: str, *, token: str | None = None) -> grpc.aio.Channel:
    """An insecure channel to `target` (host:port) with tracing and the options above; every call
    carries `token` (RENDERFLOW_SERVICE_TOKEN) when given. Its state is a metric while it lives."""
    channel = ServiceChannel(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS), token)
    _channels[channel] = target
    return channel


_channels: weakref.WeakKeyDictionary[ServiceChannel, str] = weakref.WeakKeyDictionary()


def _states(options: CallbackOptions) -> Iterable[Observation]:
    """1 for each channel's state, 0 for the others: `max by (target, state)` reads as a state."""
    for channel, target in list(_channels.items()):
        try:
            state = channel.get_state(try_to_connect=False)
        except RuntimeError:  # closed, its loop gone
            continue
        for each in grpc.ChannelConnectivity:
            yield Observation(int(each is state), {"target": target, "state": each.name.lower()})


metrics.get_meter(f"{SCOPE}.grpc").create_observable_gauge(
    "renderflow.grpc.channel.state",
    [_states],
    description="The state of each gRPC channel to a peer (1 for its state now): ready, idle, connecting, "
    "transient_failure (the peer cannot be reached), shutdown",
)
