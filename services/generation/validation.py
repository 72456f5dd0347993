"""Checks a render spec before it is queued, naming each bad field as the HTTP API does."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from services.generation.domain import Params, RenderSpec
from shared.contract import (
    KINDS,
    MAX_BATCH,
    MAX_ID,
    MAX_PROMPT,
    MAX_TIMEOUT_S,
    MAX_URL,
    PARAMS,
    PRIORITY,
    SEED_MAX,
    WORKFLOW_PATTERN,
)
from shared.errors import FieldError, ValidationFailed

# Ids name artifact files, so they must be safe as file names.
_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_ID - 1}}}$")


def is_valid_id(value: str) -> bool:
    """Whether `value` can be a render id (letters, digits, `_`, `-`; at most MAX_ID)."""
    return bool(_ID.match(value))


def normalized(spec: RenderSpec, prefix: str = "") -> RenderSpec:
    """The spec with defaults filled in and a render id chosen; ValidationFailed names every bad
    field (prefixed with `prefix`, e.g. `items[3].`)."""
    errors: list[FieldError] = []

    def bad(name: str, message: str) -> None:
        errors.append(FieldError(prefix + name, message))

    def in_range(name: str, value: float, bounds: tuple[float, float]) -> None:
        if not bounds[0] <= value <= bounds[1]:
            bad(name, f"must be between {bounds[0]} and {bounds[1]}")

    render_id = spec.render_id or str(uuid.uuid4())
    if not is_valid_id(render_id):
        bad("render_id", f"must be 1-{MAX_ID} letters, digits, '_' or '-'")
    if spec.kind not in KINDS:
        bad("kind", f"must be {' or '.join(KINDS)}")
    if not spec.prompt.strip():
        bad("prompt", "must not be empty")
    elif len(spec.prompt) > MAX_PROMPT:
        bad("prompt", f"must be at most {MAX_PROMPT} characters")
    if len(spec.negative_prompt) > MAX_PROMPT:
        bad("negative_prompt", f"must be at most {MAX_PROMPT} characters")

    # Zero means "not given" in the protocol: the kind's default then. Those the kind ignores are 0.
    kind_params = PARAMS.get(spec.kind, {})
    given: dict[str, Any] = {
        name: getattr(spec.params, name) or param.default for name, param in kind_params.items()
    }
    params = replace(Params(seed=spec.params.seed, workflow=spec.params.workflow), **given)
    for name, param in kind_params.items():
        in_range(f"params.{name}", given[name], (param.minimum, param.maximum))
    in_range("params.seed", params.seed, (0, SEED_MAX))
    if params.workflow and not re.match(WORKFLOW_PATTERN, params.workflow):
        bad("params.workflow", "must be a workflow's name: letters, digits, '_', '.' and '-', at most 64")

    reference = spec.reference
    if reference is not None:
        sources = [reference.url, reference.render_id, reference.chain_previous, reference.upload_id]
        if [bool(source) for source in sources].count(True) != 1:
            bad("reference", "must have exactly one of url, render_id, chain_previous and upload_id")
        elif reference.chain_previous:
            pass  # the render before it in its chain (none for the first: dropped when queued)
        elif reference.url:
            try:
                parts = urlsplit(reference.url)  # lowercases the scheme: HTTP:// is http (RFC 3986)
            except ValueError:  # an unbalanced [ or ] in the host
                parts = urlsplit("")
            if parts.scheme not in ("http", "https") or not parts.hostname or len(reference.url) > MAX_URL:
                bad("reference.url", f"must be an absolute http or https URL of at most {MAX_URL} characters")
        elif reference.upload_id:
            if not is_valid_id(reference.upload_id):
                bad("reference.upload_id", "is not an upload id")
        elif not is_valid_id(reference.render_id):
            bad("reference.render_id", "is not a render id")
        elif reference.render_id == render_id:
            bad("reference.render_id", "must not be the render itself")

    in_range("priority", spec.priority, (PRIORITY.minimum, PRIORITY.maximum))
    if spec.deadline is not None and spec.deadline <= datetime.now(UTC):
        bad("deadline", "must be in the future")
    if spec.timeout_s:
        in_range("timeout_s", spec.timeout_s, (0.001, MAX_TIMEOUT_S))
    if not spec.project:
        bad("project", "is required")
    for name in ("project", "chain_id"):
        if len(getattr(spec, name)) > 200:
            bad(name, "must be at most 200 characters")
    # PostgreSQL text cannot hold NUL; refuse it here, for gRPC callers that skip the gateway.
    texts = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "project": spec.project}
    if reference is not None:
        texts["reference.url"] = reference.url
    for name, text in texts.items():
        if "\x00" in text:
            bad(name, "must not contain NUL characters")

    if errors:
        raise ValidationFailed(f"{errors[0].field}: {errors[0].message}", errors)
    return replace(spec, render_id=render_id, params=params, reference=reference)


def normalized_batch(specs: list[RenderSpec]) -> list[RenderSpec]:
    """Every spec normalized; the first bad item fails the whole batch, its fields named
    `items[i].<field>`."""
    if not specs:
        raise ValidationFailed.field("items", "must not be empty")
    if len(specs) > MAX_BATCH:
        raise ValidationFailed.field("items", f"must be at most {MAX_BATCH}")
    result = [normalized(spec, f"items[{index}].") for index, spec in enumerate(specs)]
    seen: set[str] = set()
    for index, spec in enumerate(result):
        if spec.render_id in seen:
            raise ValidationFailed.field(f"items[{index}].render_id", "is repeated in the batch")
        seen.add(spec.render_id)
    return result
