"""The values the HTTP API documents and every service keeps: render kinds and statuses, render
parameters' defaults and limits, text, batch and page limits, and the phases of a render with their
budgets. Each is written here once; the gateway's schemas, the services' checks, telemetry and the
trace report read it from here, so that HTTP and gRPC callers meet the same contract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, Literal, TypeVar, get_args

Kind = Literal["image", "video"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
TERMINAL: Final[frozenset[Status]] = frozenset({"succeeded", "failed", "cancelled", "expired"})
"""Statuses a render never leaves, and the types of the events that end its stream (`expired`: its
deadline passed before it started)."""
MAX_DEADLINE_S: Final = 30 * 86_400.0
"""The furthest a deadline given in seconds from now may be."""
MAX_TIMEOUT_S: Final = 86_400.0
"""The longest execution timeout a render may ask for (the kind's configured maximum caps it too)."""

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Param(Generic[N]):
    """A render parameter: its inclusive bounds, and the value it takes when omitted."""

    minimum: N
    maximum: N
    default: N


WIDTH: Final = Param(64, 2048, 512)
HEIGHT: Final = Param(64, 2048, 512)
STEPS: Final = Param(1, 150, 20)
DURATION_S: Final = Param(0.5, 60, 2.0)  # 60, not 60.0: the OpenAPI document has always said 60
FPS: Final = Param(1, 60, 12)
PRIORITY: Final = Param(-1000, 1000, 0)
"""A render's priority: higher runs sooner among the same user's queued renders."""
SEED_MAX: Final = 2**53 - 1
"""Seeds are 0 to this, the largest integer a JSON number holds exactly; an omitted seed is random
over HTTP, and 0 over gRPC (where omitted and 0 are one)."""

_IMAGE_PARAMS: Final[dict[str, Param[int] | Param[float]]] = {
    "width": WIDTH,
    "height": HEIGHT,
    "steps": STEPS,
}
PARAMS: Final[Mapping[str, Mapping[str, Param[int] | Param[float]]]] = MappingProxyType(
    {
        "image": MappingProxyType(_IMAGE_PARAMS),
        "video": MappingProxyType({**_IMAGE_PARAMS, "duration_s": DURATION_S, "fps": FPS}),
    }
)
"""The parameters of each kind by name (the seed aside), as RenderParams names them; a kind ignores
the others."""

MAX_PROMPT: Final = 2000
"""Characters of a prompt or negative prompt."""
MAX_RULE_TEXT: Final = 2000
"""Characters of a rule's text."""
MAX_NAME: Final = 200
"""Characters of a project's or chain's name."""
MAX_ID: Final = 64
"""Characters of an id (of a render, chain or rule)."""
MAX_URL: Final = 2048
"""Characters of a reference image's URL."""
SLUG_PATTERN: Final = "^[a-z0-9][a-z0-9-]{1,62}$"
"""A project's slug: 2-63 of a-z, 0-9 and `-`, not starting with `-`."""
WORKFLOW_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A workflow's name (its file's stem, see the comfyui backend): 1-64 of letters, digits, `_`, `.`
and `-`, starting with a letter or digit."""
MAX_BATCH: Final = 64
"""Renders in one batch."""
DEFAULT_PAGE_SIZE: Final = 50
"""Items in a page of a list when the request does not say."""
MAX_PAGE_SIZE: Final = 200
"""Items in a page of a list at most (more is capped over gRPC, refused over HTTP)."""

Phase = Literal["auth", "validation", "db", "enqueue", "queue_wait", "image_fetch", "generation", "store"]
PHASES: Final[tuple[Phase, ...]] = get_args(Phase)
"""The phases of a render (docs/architecture.md) in the order it goes through them. Each is a `<phase>_ms`
timing of the render, a label of the phase histogram, and in traces a span (the worker's phases) or
an attribute of the request's span (`phase_attribute`: the request phases, too short for a span)."""
REQUEST_PHASES: Final = PHASES[:4]
"""The phases of the gateway's request (auth, validation, db, enqueue); the others are the worker's."""
TIMINGS: Final[tuple[str, ...]] = (*PHASES, "total")
"""The render's `timings`, each as `<name>_ms`: its phases, then its whole time."""
WAIT: Final = "wait"
"""The gateway holding a submit's answer for `Prefer: wait`: timed like a phase (an attribute of
the request's span, a Server-Timing entry), but no phase of the render (no timing, no budget: the
client chose its length)."""
Timed = Phase | Literal["wait"]
"""What the gateway and the workers time: the phases and the wait."""
PHASE_ATTRIBUTE_PREFIX: Final = "renderflow.phases."


def phase_attribute(phase: str) -> str:
    """The attribute of a request's span that holds the milliseconds it spent in `phase`
    (`renderflow.phases.auth_ms`)."""
    return f"{PHASE_ATTRIBUTE_PREFIX}{phase}_ms"


PHASE_BUDGETS_MS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "auth": 100.0,  # API key to user (cached)
        "validation": 50.0,  # reading and validating the request
        "db": 200.0,  # the metadata and generation calls of one request, in all
        "enqueue": 50.0,  # generation.Submit
        "image_fetch": 2000.0,  # the reference image
        "store": 1000.0,  # writing the artifact
    }
)
"""Slow-operation budgets (docs/architecture.md), the defaults of RENDERFLOW_BUDGET_<PHASE>_MS. queue_wait and
generation have none: they depend on the load and on the kind, and are only reported."""
