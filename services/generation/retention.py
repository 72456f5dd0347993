"""How long outputs and render records are kept: the policy a submit applies, and the sweep that
deletes what is past it (run by the generation service; several replicas share the work).

An output's retention is fixed when its render is queued (the request's `retention_s`, within the
maximum, else the service's default) and counted from when it succeeds. A record's retention is the
service's, counted from when the render ended; it takes what is left of the output with it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from services.generation.background import periodically
from services.generation.domain import RenderSpec
from shared.errors import ValidationFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    """`output_s`: the default lifetime of an output (0: for ever); `max_s`: the longest a request may
    ask for (0: any)."""

    output_s: float = 0.0
    max_s: float = 0.0

    def applied(self, spec: RenderSpec, field_prefix: str = "") -> RenderSpec:
        """The spec with the retention it gets; ValidationFailed when it asks for more than the
        maximum."""
        if self.max_s and spec.retention_s > self.max_s:
            message = f"must be at most {self.max_s:g} seconds"
            raise ValidationFailed.field(f"{field_prefix}retention_s", message)
        return replace(spec, retention_s=spec.retention_s or self.output_s)


async def sweep_retention(sweep: Callable[[], Awaitable[tuple[int, int, int]]], interval_s: float) -> None:
    """Calls `sweep` about every `interval_s`, for ever; it returns how many outputs, render records
    and expired uploads it deleted."""
    await periodically(sweep, interval_s, "retention sweep", _report)


def _report(deleted: tuple[int, int, int]) -> None:
    outputs, records, uploads = deleted
    if outputs or records or uploads:
        counts = {"outputs_deleted": outputs, "records_deleted": records, "uploads_deleted": uploads}
        log.info("retention applied", extra=counts)
