"""Render specs are checked field by field, with the HTTP API's field names, and defaults filled."""

from __future__ import annotations

from typing import Any

import pytest

from services.generation.domain import Params, Reference, RenderSpec
from services.generation.validation import normalized, normalized_batch
from shared.errors import ValidationFailed


def _spec(**fields: Any) -> RenderSpec:
    """A spec of project `art` (which every spec must name)."""
    return RenderSpec(**{"project": "art", **fields})


def _fields(spec: RenderSpec) -> set[str]:
    with pytest.raises(ValidationFailed) as caught:
        normalized(spec)
    return {error.field for error in caught.value.errors}


def test_a_minimal_spec_gets_an_id_and_defaults() -> None:
    spec = normalized(_spec(prompt="a fox", params=Params(width=0, height=0, steps=0)))
    assert spec.render_id and spec.params == Params(width=512, height=512, steps=20, seed=0)


def test_videos_get_video_defaults() -> None:
    spec = normalized(_spec(kind="video", prompt="waves"))
    assert (spec.params.duration_s, spec.params.fps) == (2.0, 12)  # as over HTTP


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        (_spec(prompt=""), {"prompt"}),
        (_spec(prompt="   "), {"prompt"}),
        (_spec(prompt="x" * 2001), {"prompt"}),
        (_spec(prompt="x", kind="gif"), {"kind"}),
        (_spec(prompt="x", params=Params(width=63, height=2049)), {"params.width", "params.height"}),
        (_spec(prompt="x", params=Params(steps=151, seed=-1)), {"params.steps", "params.seed"}),
        (_spec(prompt="x", kind="video", params=Params(fps=120)), {"params.fps"}),
        (_spec(prompt="x", render_id="../etc/passwd"), {"render_id"}),
        (_spec(prompt="x", reference=Reference()), {"reference"}),
        (_spec(prompt="x", reference=Reference(url="file:///etc/passwd")), {"reference.url"}),
        (_spec(prompt="x", reference=Reference(url="https://v]~h/a.png")), {"reference.url"}),  # not a 500
        (_spec(prompt="x", timeout_s=-1.0), {"timeout_s"}),
        (_spec(prompt="x", reference=Reference(render_id="a/b")), {"reference.render_id"}),
        (
            _spec(prompt="x", render_id="r1", reference=Reference(render_id="r1")),
            {"reference.render_id"},
        ),
        (_spec(prompt="x", project=""), {"project"}),
        (_spec(prompt="x", project="p" * 201), {"project"}),
        (_spec(prompt="x", chain_id="c" * 201), {"chain_id"}),
        (_spec(prompt="x", priority=5000), {"priority"}),
    ],
)
def test_each_bad_field_is_named(spec: RenderSpec, fields: set[str]) -> None:
    assert _fields(spec) == fields


@pytest.mark.parametrize("url", ["HTTP://example.com/a.png", "HtTpS://example.com/a.png"])
def test_a_reference_url_scheme_is_read_in_any_case(url: str) -> None:
    spec = normalized(_spec(prompt="x", reference=Reference(url=url)))
    assert spec.reference is not None and spec.reference.url == url  # kept as given; imagefetch normalizes


def test_a_batch_names_the_first_bad_item_by_index() -> None:
    good, bad = _spec(prompt="x"), _spec(prompt="")
    with pytest.raises(ValidationFailed) as caught:
        normalized_batch([good, bad, bad])
    assert [e.field for e in caught.value.errors] == ["items[1].prompt"]
    with pytest.raises(ValidationFailed) as caught:
        normalized_batch([_spec(prompt="x", render_id="same"), _spec(prompt="y", render_id="same")])
    assert [e.field for e in caught.value.errors] == ["items[1].render_id"]
    with pytest.raises(ValidationFailed):
        normalized_batch([good] * 65)


def test_a_chain_reference_is_one_source_and_kept_for_the_queue() -> None:
    # The chain (the project's default when none is named) and the position are generation's to
    # resolve when it queues the render: the spec alone cannot tell whether a render is the first
    # of its chain, whose reference is then dropped (tests/integration/test_generation_chains.py).
    previous = Reference(chain_previous=True)
    both = Reference(url="https://example.com/a.png", chain_previous=True)
    assert _fields(_spec(prompt="x", chain_id="c", reference=both)) == {"reference"}
    assert normalized(_spec(prompt="x", reference=previous)).reference == previous
    assert normalized(_spec(prompt="x", chain_id="c", reference=previous)).reference == previous


def test_nul_characters_are_refused_by_field() -> None:
    given = _spec(prompt="a\x00b", negative_prompt="ok", project="art\x00")
    assert _fields(given) == {"prompt", "project"}
