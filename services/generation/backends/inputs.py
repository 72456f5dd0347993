"""A model's inputs as the operator maps Renderflow's fields onto them: a JSON template whose strings
name placeholders, checked when the worker starts.

Hosted models name their inputs each their own way (`num_inference_steps`, `aspect_ratio`,
`image_url`, ...). A template such as

    {"prompt": "{prompt_with_rules}", "aspect_ratio": "{aspect_ratio}",
     "num_inference_steps": "{steps}", "seed": "{seed}", "image": "{image}"}

is filled per render: a string that is exactly one placeholder takes the value with its type (an
integer stays an integer), any other string is formatted; objects and lists are filled throughout.
A key whose value is a lone placeholder with nothing to say (no reference image, no negative
prompt) is left out. An unknown placeholder, or a template that is not a JSON object, is a
configuration error at start, never a failed render.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from services.generation.backends import GenerationInput
from services.generation.backends.predictions import sniff
from shared.settings import ConfigError

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def values(job: GenerationInput) -> dict[str, Any]:
    """Every placeholder's value for `job` (None: nothing to say)."""
    divisor = math.gcd(job.width, job.height) or 1
    image = None
    if job.reference is not None:
        encoded = base64.b64encode(job.reference).decode()
        image = f"data:{sniff(job.reference) or 'application/octet-stream'};base64,{encoded}"
    return {
        "kind": job.kind,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "rules": "\n".join(job.rules) or None,
        "prompt_with_rules": "\n".join([job.prompt, *job.rules]),
        "width": job.width,
        "height": job.height,
        "size": f"{job.width}x{job.height}",
        "aspect_ratio": f"{job.width // divisor}:{job.height // divisor}",
        "steps": job.steps,
        "seed": job.seed,
        "image": image,
        "duration_s": job.duration_s if job.kind == "video" else None,
        "fps": job.fps if job.kind == "video" else None,
        "frames": round(job.duration_s * job.fps) if job.kind == "video" else None,
    }


PLACEHOLDERS = tuple(values(GenerationInput("", "image", "", "", 1, 1, 1, 0)))
"""The names a template may use."""


@dataclass(frozen=True)
class InputTemplate:
    """A checked template (see the module docstring)."""

    template: dict[str, Any]

    @classmethod
    def parse(cls, text: str, variable: str) -> InputTemplate:
        """The template of `text`; ConfigError naming `variable` and what is wrong."""
        try:
            template = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{variable} is not JSON: {exc}") from None
        if not isinstance(template, dict):
            raise ConfigError(f"{variable} must be a JSON object")
        unknown = sorted(set(_names(template)) - set(PLACEHOLDERS))
        if unknown:
            raise ConfigError(
                f"{variable} names unknown placeholders {unknown}; known: {', '.join(PLACEHOLDERS)}"
            )
        return cls(template)

    def fill(self, job: GenerationInput, **overrides: Any) -> dict[str, Any]:
        """The model's inputs for `job`; `overrides` replace placeholders' values (e.g. `image` as
        the name of an uploaded file rather than a data URL)."""
        filled = _fill(self.template, values(job) | overrides)
        assert isinstance(filled, dict)
        return filled

    def uses(self, placeholder: str) -> bool:
        """Whether the template names `placeholder` anywhere."""
        return placeholder in _names(self.template)


_NOTHING = object()


def _fill(node: Any, given: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        filled = {key: _fill(value, given) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _NOTHING}
    if isinstance(node, list):
        return [value for value in (_fill(item, given) for item in node) if value is not _NOTHING]
    if not isinstance(node, str):
        return node
    whole = _PLACEHOLDER.fullmatch(node)
    if whole:
        value = given[whole.group(1)]
        return _NOTHING if value is None else value
    return _PLACEHOLDER.sub(lambda m: "" if given[m.group(1)] is None else str(given[m.group(1)]), node)


def _names(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [name for value in node.values() for name in _names(value)]
    if isinstance(node, list):
        return [name for item in node for name in _names(item)]
    return _PLACEHOLDER.findall(node) if isinstance(node, str) else []
