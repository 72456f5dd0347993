"""Render specs are checked field by field, with the HTTP API's field names, and defaults filled."""

from __future__ import annotations

import pytest

from services.generation.domain import Params, Reference, RenderSpec, Rule
from services.generation.validation import normalized, normalized_batch
from shared.errors import ValidationFailed


def _fields(spec: RenderSpec) -> set[str]:
    with pytest.raises(ValidationFailed) as caught:
        normalized(spec)
    return {error.field for error in caught.value.errors}


def test_a_minimal_spec_gets_an_id_and_defaults() -> None:
    spec = normalized(RenderSpec(prompt="a fox", params=Params(width=0, height=0, steps=0)))
    assert spec.render_id and spec.params == Params(width=512, height=512, steps=20, seed=0)


def test_videos_get_video_defaults() -> None:
    spec = normalized(RenderSpec(kind="video", prompt="waves"))
    assert (spec.params.duration_s, spec.params.fps) == (2.0, 12)  # as over HTTP


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        (RenderSpec(prompt=""), {"prompt"}),
        (RenderSpec(prompt="   "), {"prompt"}),
        (RenderSpec(prompt="x" * 2001), {"prompt"}),
        (RenderSpec(prompt="x", kind="gif"), {"kind"}),
        (RenderSpec(prompt="x", params=Params(width=63, height=2049)), {"params.width", "params.height"}),
        (RenderSpec(prompt="x", params=Params(steps=151, seed=-1)), {"params.steps", "params.seed"}),
        (RenderSpec(prompt="x", kind="video", params=Params(fps=120)), {"params.fps"}),
        (RenderSpec(prompt="x", render_id="../etc/passwd"), {"render_id"}),
        (RenderSpec(prompt="x", reference=Reference()), {"reference"}),
        (RenderSpec(prompt="x", reference=Reference(url="file:///etc/passwd")), {"reference.url"}),
        (RenderSpec(prompt="x", reference=Reference(render_id="a/b")), {"reference.render_id"}),
        (
            RenderSpec(prompt="x", render_id="r1", reference=Reference(render_id="r1")),
            {"reference.render_id"},
        ),
        (RenderSpec(prompt="x", rules=(Rule("1", "y" * 2001),)), {"rules[0].text"}),
        (RenderSpec(prompt="x", priority=5000), {"priority"}),
    ],
)
def test_each_bad_field_is_named(spec: RenderSpec, fields: set[str]) -> None:
    assert _fields(spec) == fields


@pytest.mark.parametrize("url", ["HTTP://example.com/a.png", "HtTpS://example.com/a.png"])
def test_a_reference_url_scheme_is_read_in_any_case(url: str) -> None:
    spec = normalized(RenderSpec(prompt="x", reference=Reference(url=url)))
    assert spec.reference is not None and spec.reference.url == url  # kept as given; imagefetch normalizes


def test_a_batch_names_the_first_bad_item_by_index() -> None:
    good, bad = RenderSpec(prompt="x"), RenderSpec(prompt="")
    with pytest.raises(ValidationFailed) as caught:
        normalized_batch([good, bad, bad])
    assert [e.field for e in caught.value.errors] == ["items[1].prompt"]
    with pytest.raises(ValidationFailed) as caught:
        normalized_batch([RenderSpec(prompt="x", render_id="same"), RenderSpec(prompt="y", render_id="same")])
    assert [e.field for e in caught.value.errors] == ["items[1].render_id"]
    with pytest.raises(ValidationFailed):
        normalized_batch([good] * 65)


def test_a_chain_reference_needs_the_chain_and_is_dropped_for_the_first_render() -> None:
    previous = Reference(chain_previous=True)
    assert _fields(RenderSpec(prompt="x", reference=previous)) == {"reference.chain_previous"}
    both = Reference(url="https://example.com/a.png", chain_previous=True)
    assert _fields(RenderSpec(prompt="x", chain_id="c", position=2, reference=both)) == {"reference"}
    first = normalized(RenderSpec(prompt="x", chain_id="c", position=1, reference=previous))
    assert first.reference is None
    second = normalized(RenderSpec(prompt="x", chain_id="c", position=2, reference=previous))
    assert second.reference == previous


def test_nul_characters_are_refused_by_field() -> None:
    given = RenderSpec(prompt="a\x00b", negative_prompt="ok", rules=[Rule("r1", "x\x00")])
    assert _fields(given) == {"prompt", "rules[0].text"}
