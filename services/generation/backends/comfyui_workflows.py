"""The ComfyUI workflows an operator registers, and which one renders a job.

A workflow is a graph in ComfyUI's API format (what "Export (API)" saves: `{node_id: {class_type,
inputs}}`) whose string inputs may name placeholders, filled per render as `inputs.py` describes:
`{prompt_with_rules}`, `{negative_prompt}`, `{seed}`, `{width}`, `{height}`, `{steps}`, `{image}`
(the name of the render's reference image, uploaded to the instance), `{duration_s}`, `{fps}`...

Workflows are the `*.json` files of one directory, each named by its file's stem. Without a
directory of its own the backend uses the two it ships (`workflows/`): `txt2img` and `img2img`,
ComfyUI's default graph over the `v1-5-pruned-emaonly` checkpoint. Every file is read and checked
when the worker starts: a graph that is not one, an unknown placeholder, or a chosen workflow that
is missing is a configuration error then, never a failed render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.generation.backends import GenerationInput, PermanentBackendError
from services.generation.backends.inputs import InputTemplate
from shared.contract import WORKFLOW_PATTERN
from shared.settings import ConfigError

BUILT_IN = Path(__file__).with_name("workflows")
NAME = re.compile(WORKFLOW_PATTERN)
"""A workflow's name: its file's stem, also what a render may ask for."""


@dataclass(frozen=True)
class Workflow:
    """One registered graph."""

    name: str
    template: InputTemplate
    samplers: tuple[str, ...]
    """The ids of the nodes that sample step by step (whose `progress` events are the render's
    steps), in the graph's order."""

    @property
    def takes_image(self) -> bool:
        """Whether the graph loads the render's reference image."""
        return self.template.uses("image")

    def graph(self, job: GenerationInput, image: str | None) -> dict[str, Any]:
        """The graph to queue for `job`, `image` being the uploaded reference's name. Text inputs
        with nothing to say are empty strings (a node's input cannot be left out)."""
        return self.template.fill(
            job, image=image, negative_prompt=job.negative_prompt, rules="\n".join(job.rules)
        )

    @classmethod
    def load(cls, path: Path) -> Workflow:
        variable = f"the ComfyUI workflow {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{variable} cannot be read: {exc.strerror}") from None
        template = InputTemplate.parse(text, variable)
        nodes = template.template
        for node_id, node in nodes.items():
            if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)):
                raise ConfigError(
                    f"{variable} is not in ComfyUI's API format: node {node_id!r} has no class_type "
                    "(export it with 'Export (API)')"
                )
            if not isinstance(node.get("inputs", {}), dict):
                raise ConfigError(f"{variable}: the inputs of node {node_id!r} are not an object")
        samplers = tuple(node_id for node_id, node in nodes.items() if "Sampler" in node["class_type"])
        return cls(path.stem, template, samplers)


@dataclass(frozen=True)
class Workflows:
    """The registered workflows and the default of each case."""

    by_name: dict[str, Workflow]
    image: str
    """RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_IMAGE: the workflow of an image render that names none
    and has no reference image (default `txt2img`)."""
    reference: str
    """RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_REFERENCE: the workflow of an image render with a
    reference image that names none (default `img2img`)."""
    video: str
    """RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_VIDEO: the workflow of a video render that names none;
    required when videos are made by comfyui (no default: video graphs depend on their models)."""

    @classmethod
    def load(cls, directory: str, image: str, reference: str, video: str) -> Workflows:
        """The workflows of `directory` (the built-in ones when empty), the defaults checked."""
        folder = Path(directory) if directory else BUILT_IN
        if not folder.is_dir():
            raise ConfigError(f"RENDERFLOW_BACKEND_COMFYUI_WORKFLOWS: {folder} is not a directory")
        by_name = {}
        for path in sorted(folder.glob("*.json")):
            if not NAME.match(path.stem):
                raise ConfigError(f"the ComfyUI workflow {path}: its name must match {NAME.pattern}")
            by_name[path.stem] = Workflow.load(path)
        for variable, name in (
            ("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_IMAGE", image),
            ("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_REFERENCE", reference),
            ("RENDERFLOW_BACKEND_COMFYUI_WORKFLOW_VIDEO", video),
        ):
            if name and name not in by_name:
                known = ", ".join(by_name) or "none"
                raise ConfigError(f"{variable}: no workflow {name!r} in {folder} (found: {known})")
        return cls(by_name, image, reference, video)

    def choose(self, job: GenerationInput) -> Workflow:
        """The workflow that renders `job`: the one it names, else its case's default;
        PermanentBackendError when there is none or it cannot take the job as it is."""
        name = job.workflow or (
            self.video if job.kind == "video" else self.reference if job.reference is not None else self.image
        )
        workflow = self.by_name.get(name)
        if workflow is None:
            what = f"no workflow {name!r}" if name else f"no workflow for {job.kind} renders"
            raise PermanentBackendError(f"the ComfyUI backend has {what}", "unknown_workflow")
        if job.reference is not None and not workflow.takes_image:
            raise PermanentBackendError(
                f"the workflow {name!r} takes no reference image", "reference_unsupported"
            )
        if job.reference is None and workflow.takes_image:
            raise PermanentBackendError(
                f"the workflow {name!r} needs a reference image", "reference_required"
            )
        return workflow
