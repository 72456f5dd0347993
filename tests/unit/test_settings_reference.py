"""The settings reference (docs/settings.md) lists every variable the code reads, as the code
defines it; a renamed variable's old name still works for a release, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared import settings as settings_module
from shared.settings import RENAMED, Env
from tools.settings_reference import REFERENCE, collect, reference


def test_every_variable_read_is_defined_and_the_reference_is_current() -> None:
    settings, undefined = collect()
    assert undefined == [], "read but defined by no `NAME: what it does` docstring"
    assert REFERENCE.read_text() == reference(settings), "run: .venv/bin/python -m tools.settings_reference"


def test_a_variable_read_without_a_definition_is_found(tmp_path: Path) -> None:
    module = tmp_path / "services" / "thing" / "config.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "def load(env):\n"
        '    """RENDERFLOW_THING_SIZE: how big the thing is."""\n'
        '    return env.int("RENDERFLOW_THING_SIZE", 4), env.int("RENDERFLOW_THING_UNSAID", 1)\n'
    )
    settings, undefined = collect(tmp_path)
    assert undefined == ["RENDERFLOW_THING_UNSAID"]
    assert settings["RENDERFLOW_THING_SIZE"].defaults == {"4"}
    assert settings["RENDERFLOW_THING_SIZE"].meaning == "how big the thing is."


def test_the_reference_names_every_area_and_every_old_name() -> None:
    text = REFERENCE.read_text()
    for old, new in RENAMED.items():
        assert f"| `{old}` | " in text and all(f"`{name}`" in text for name in new)


def test_an_old_name_is_read_with_a_warning_when_the_new_one_is_unset(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "_warned", set())  # warned once a process: start afresh
    old, (new,) = "RENDERFLOW_FETCH_MAX_ATTEMPTS", RENAMED["RENDERFLOW_FETCH_MAX_ATTEMPTS"]
    with caplog.at_level(logging.WARNING, logger="shared.settings"):
        assert Env({old: "7"}).int(new, 3) == 7
    assert any(old in r.getMessage() and new in r.getMessage() for r in caplog.records)
    assert Env({old: "7", new: "5"}).int(new, 3) == 5  # the new name wins
    assert Env({}).int(new, 3) == 3


def test_an_old_name_split_in_two_feeds_both() -> None:
    env = Env({"RENDERFLOW_DRAIN_GRACE_S": "9"})
    assert env.float("RENDERFLOW_GENERATION_DRAIN_GRACE_S", 5.0) == 9.0
    assert env.float("RENDERFLOW_IMAGEFETCH_DRAIN_GRACE_S", 5.0) == 9.0
