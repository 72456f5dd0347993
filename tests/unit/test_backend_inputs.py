"""A model's inputs from the operator's template: typed placeholders, formatted strings, keys with
nothing to say left out, and a template that cannot be filled refused at start."""

from __future__ import annotations

import pytest

from services.generation.backends import GenerationInput
from services.generation.backends.inputs import InputTemplate
from shared.settings import ConfigError

JOB = GenerationInput("r1", "image", "a fox", "", 1536, 1024, 28, 42, rules=("no text",))
PNG = b"\x89PNG\r\n\x1a\n" + b"rest"


def test_a_lone_placeholder_keeps_its_type_and_others_are_formatted() -> None:
    template = InputTemplate.parse(
        '{"prompt": "{prompt_with_rules}", "aspect_ratio": "{aspect_ratio}",'
        ' "num_inference_steps": "{steps}", "seed": "{seed}", "size": "{width}*{height}",'
        ' "options": {"tags": ["{kind}", "fixed"]}, "n": 1}',
        "X",
    )
    assert template.fill(JOB) == {
        "prompt": "a fox\nno text",
        "aspect_ratio": "3:2",
        "num_inference_steps": 28,
        "seed": 42,
        "size": "1536*1024",
        "options": {"tags": ["image", "fixed"]},
        "n": 1,
    }


def test_keys_with_nothing_to_say_are_left_out() -> None:
    template = InputTemplate.parse(
        '{"prompt": "{prompt}", "image": "{image}", "negative": "{negative_prompt}"}', "X"
    )
    assert template.fill(JOB) == {"prompt": "a fox"}
    with_reference = GenerationInput("r2", "image", "a fox", "blur", 64, 64, 4, 1, reference=PNG)
    filled = template.fill(with_reference)
    assert filled["image"].startswith("data:image/png;base64,") and filled["negative"] == "blur"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"prompt": "{promt}"}', "unknown placeholders \\['promt'\\]"),
        ('["{prompt}"]', "must be a JSON object"),
        ("{prompt}", "is not JSON"),
    ],
)
def test_a_template_that_cannot_be_filled_is_refused_at_start(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        InputTemplate.parse(text, "RENDERFLOW_BACKEND_HTTP_INPUT")
