"""How the generation service delivers webhooks."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Env
from shared.url_guard import Network, allow_list

DAY_S = 86400.0


@dataclass(frozen=True)
class WebhookSettings:
    """The dispatcher's pace and patience, and which private receivers are allowed."""

    dispatch: bool = True
    """RENDERFLOW_WEBHOOKS_DISPATCH: whether this generation process sends deliveries (every replica
    may: they share the work); `false` leaves them to others."""
    poll_s: float = 0.25
    """RENDERFLOW_WEBHOOKS_POLL_S: how often due deliveries are looked for."""
    concurrency: int = 64
    """RENDERFLOW_WEBHOOKS_CONCURRENCY: deliveries in flight at once, per generation process."""
    per_receiver: int = 16
    """RENDERFLOW_WEBHOOKS_PER_RECEIVER: deliveries in flight at once to one URL, across processes: a
    receiver that hangs holds no more of the dispatchers' slots than this, and one that answers in
    a second takes this many deliveries a second."""
    timeout_s: float = 10.0
    """RENDERFLOW_WEBHOOKS_TIMEOUT_S: the most one attempt may take, connecting included."""
    backoff_s: float = 5.0
    """RENDERFLOW_WEBHOOKS_BACKOFF_S: the pause after a first failed attempt; it doubles each time,
    with jitter, up to RENDERFLOW_WEBHOOKS_BACKOFF_MAX_S (a receiver's Retry-After is honoured)."""
    backoff_max_s: float = 3600.0
    """RENDERFLOW_WEBHOOKS_BACKOFF_MAX_S: the longest pause between two attempts."""
    retry_for_s: float = DAY_S
    """RENDERFLOW_WEBHOOKS_RETRY_FOR_S: how long after its event a delivery is still tried; then it
    is `failed` (it can still be redelivered)."""
    disable_after_s: float = 5 * DAY_S
    """RENDERFLOW_WEBHOOKS_DISABLE_AFTER_S: an endpoint whose deliveries have all failed for this long
    is disabled (its owner enables it again with PATCH)."""
    rotation_overlap_s: float = DAY_S
    """RENDERFLOW_WEBHOOKS_ROTATION_OVERLAP_S: how long a rotated secret keeps signing beside the new
    one, unless the rotation asks otherwise."""
    allow: tuple[Network, ...] = ()
    """The private addresses receivers may be at: RENDERFLOW_IMAGEFETCH_ALLOW, as for reference images
    (checked here when a receiver is named, and by the image fetcher at every delivery)."""

    @classmethod
    def from_env(cls, env: Env) -> WebhookSettings:
        return cls(
            dispatch=env.bool("RENDERFLOW_WEBHOOKS_DISPATCH", cls.dispatch),
            poll_s=env.float("RENDERFLOW_WEBHOOKS_POLL_S", cls.poll_s, minimum=0.01),
            concurrency=env.int("RENDERFLOW_WEBHOOKS_CONCURRENCY", cls.concurrency, minimum=1),
            per_receiver=env.int("RENDERFLOW_WEBHOOKS_PER_RECEIVER", cls.per_receiver, minimum=1),
            timeout_s=env.float("RENDERFLOW_WEBHOOKS_TIMEOUT_S", cls.timeout_s, minimum=0.1),
            backoff_s=env.float("RENDERFLOW_WEBHOOKS_BACKOFF_S", cls.backoff_s, minimum=0.01),
            backoff_max_s=env.float("RENDERFLOW_WEBHOOKS_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0.01),
            retry_for_s=env.float("RENDERFLOW_WEBHOOKS_RETRY_FOR_S", cls.retry_for_s, minimum=0),
            disable_after_s=env.float("RENDERFLOW_WEBHOOKS_DISABLE_AFTER_S", cls.disable_after_s, minimum=0),
            rotation_overlap_s=env.float(
                "RENDERFLOW_WEBHOOKS_ROTATION_OVERLAP_S", cls.rotation_overlap_s, minimum=0
            ),
            allow=allow_list(env),
        )
