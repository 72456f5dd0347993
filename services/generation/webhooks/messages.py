"""Webhook endpoints, secrets and deliveries as protobuf messages."""

from __future__ import annotations

from renderflow.v1 import generation_pb2 as pb

from services.generation.webhooks.store import Delivery, Endpoint, Secret
from shared.protobuf_time import timestamp


def endpoint_pb(endpoint: Endpoint) -> pb.WebhookEndpoint:
    message = pb.WebhookEndpoint(
        id=endpoint.id,
        project=endpoint.project,
        url=endpoint.url,
        events=list(endpoint.events),
        description=endpoint.description,
        state="enabled" if endpoint.enabled else "disabled",
        disabled_reason=endpoint.disabled_reason,
        created_at=timestamp(endpoint.created_at),
        secret=endpoint.secret,
    )
    if endpoint.failing_since is not None:
        message.failing_since.CopyFrom(timestamp(endpoint.failing_since))
    return message


def secret_pb(secret: Secret) -> pb.WebhookSecret:
    message = pb.WebhookSecret(secret=secret.secret)
    if secret.previous_expires_at is not None:
        message.previous_expires_at.CopyFrom(timestamp(secret.previous_expires_at))
    return message


def delivery_pb(delivery: Delivery) -> pb.Delivery:
    message = pb.Delivery(
        id=delivery.id,
        render_id=delivery.render_id,
        endpoint_id=delivery.endpoint_id,
        event=delivery.event,
        url=delivery.url,
        state=delivery.state,
        attempts=delivery.attempts,
        created_at=timestamp(delivery.created_at),
        attempt_log=[
            pb.DeliveryAttempt(
                number=attempt.number,
                at=timestamp(attempt.at),
                outcome=attempt.outcome,
                status=attempt.status,
                latency_ms=attempt.latency_ms,
                message=attempt.message,
                response_excerpt=attempt.response_excerpt,
            )
            for attempt in delivery.log
        ],
    )
    for name in ("next_attempt_at", "delivered_at"):
        value = getattr(delivery, name)
        if value is not None:
            getattr(message, name).CopyFrom(timestamp(value))
    return message
