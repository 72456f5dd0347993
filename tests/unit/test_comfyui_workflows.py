"""The ComfyUI workflows an operator registers: read and checked at start, and the one a render gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.generation.backends import GenerationInput, PermanentBackendError
from services.generation.backends.comfyui_workflows import Workflows
from shared.settings import ConfigError

IMAGE = GenerationInput("r1", "image", "a red fox", "", 64, 48, 8, 7, rules=("no text",))


def _write(folder: Path, name: str, graph: object) -> None:
    (folder / f"{name}.json").write_text(json.dumps(graph))


def test_the_built_in_workflows_fill_in_the_render() -> None:
    workflows = Workflows.load("", image="txt2img", reference="img2img", video="")

    workflow = workflows.choose(IMAGE)
    graph = workflow.graph(IMAGE, None)

    assert (workflow.name, workflow.samplers, workflow.takes_image) == ("txt2img", ("3",), False)
    assert graph["3"]["inputs"]["seed"] == 7 and graph["3"]["inputs"]["steps"] == 8
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (64, 48)
    assert graph["6"]["inputs"]["text"] == "a red fox\nno text"
    assert graph["7"]["inputs"]["text"] == ""  # an input cannot be left out: empty text
    with_reference = workflows.choose(GenerationInput("r2", "image", "x", "", 64, 48, 8, 7, reference=b"png"))
    assert with_reference.name == "img2img"
    assert with_reference.graph(IMAGE, "renderflow-ab.png")["10"]["inputs"]["image"] == "renderflow-ab.png"


def test_a_render_may_name_a_registered_workflow_and_nothing_else(tmp_path: Path) -> None:
    _write(tmp_path, "flux-dev", {"1": {"class_type": "KSampler", "inputs": {"seed": "{seed}"}}})
    workflows = Workflows.load(str(tmp_path), image="flux-dev", reference="", video="")

    assert workflows.choose(IMAGE).name == "flux-dev"
    with pytest.raises(PermanentBackendError) as unknown:
        workflows.choose(GenerationInput("r", "image", "x", "", 64, 64, 4, 1, workflow="sdxl"))
    assert unknown.value.reason == "unknown_workflow" and "'sdxl'" in str(unknown.value)
    with pytest.raises(PermanentBackendError) as no_video:
        workflows.choose(GenerationInput("r", "video", "x", "", 64, 64, 4, 1))
    assert no_video.value.reason == "unknown_workflow"
    with pytest.raises(PermanentBackendError) as reference:  # flux-dev loads no image
        workflows.choose(
            GenerationInput("r", "image", "x", "", 64, 64, 4, 1, reference=b"png", workflow="flux-dev")
        )
    assert reference.value.reason == "reference_unsupported"


def test_an_image_workflow_without_its_reference_is_refused() -> None:
    workflows = Workflows.load("", image="txt2img", reference="img2img", video="")

    with pytest.raises(PermanentBackendError) as refused:
        workflows.choose(GenerationInput("r", "image", "x", "", 64, 64, 4, 1, workflow="img2img"))

    assert refused.value.reason == "reference_required"


@pytest.mark.parametrize(
    ("graph", "complaint"),
    [
        ({"1": {"class_type": "KSampler", "inputs": {"seed": "{sed}"}}}, "unknown placeholders ['sed']"),
        ({"nodes": [], "links": []}, "not in ComfyUI's API format"),  # the UI's format, not the API's
        ([1, 2], "must be a JSON object"),
    ],
)
def test_a_workflow_that_cannot_be_filled_stops_the_worker_at_start(
    tmp_path: Path, graph: object, complaint: str
) -> None:
    _write(tmp_path, "broken", graph)

    with pytest.raises(ConfigError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        Workflows.load(str(tmp_path), image="broken", reference="", video="")


def test_a_default_that_names_no_registered_workflow_stops_the_worker_at_start(tmp_path: Path) -> None:
    _write(tmp_path, "txt2img", {"1": {"class_type": "KSampler", "inputs": {}}})

    with pytest.raises(ConfigError, match=r"WORKFLOW_VIDEO: no workflow 'wan' .* \(found: txt2img\)"):
        Workflows.load(str(tmp_path), image="txt2img", reference="", video="wan")
    with pytest.raises(ConfigError, match="is not a directory"):
        Workflows.load(str(tmp_path / "missing"), image="txt2img", reference="", video="")
