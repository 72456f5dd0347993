"""Where the client finds its gateway, key and project: arguments, then the environment, then the
config file; and how `rf` reads its parameters and batch files."""

from __future__ import annotations

from pathlib import Path

import pytest
from renderflow_client.cli import _batch_items, _param
from renderflow_client.config import DEFAULT_URL, load_config


def test_arguments_then_environment_then_file(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('url = "https://file.example/"\napi_key = "rf_file"\nproject = "from-file"\n')
    env = {"RENDERFLOW_URL": "https://env.example", "RENDERFLOW_API_KEY": "rf_env"}

    from_file = load_config(env={}, file=file)
    from_env = load_config(env=env, file=file)
    given = load_config("https://arg.example", "rf_arg", "arg-project", env=env, file=file)

    assert (from_file.url, from_file.api_key, from_file.project) == (
        "https://file.example",
        "rf_file",
        "from-file",
    )
    assert (from_env.url, from_env.api_key, from_env.project) == (
        "https://env.example",
        "rf_env",
        "from-file",
    )
    assert (given.url, given.api_key, given.project) == ("https://arg.example", "rf_arg", "arg-project")
    assert "rf_arg" not in repr(given)


def test_without_anything_the_local_stack(tmp_path: Path) -> None:
    config = load_config(env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert (config.url, config.api_key, config.project) == (DEFAULT_URL, None, None)


def test_the_file_is_found_under_xdg_config_home(tmp_path: Path) -> None:
    (tmp_path / "renderflow").mkdir()
    (tmp_path / "renderflow" / "config.toml").write_text('project = "xdg"\n')
    assert load_config(env={"XDG_CONFIG_HOME": str(tmp_path)}).project == "xdg"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("width=512", ("width", 512)), ("workflow=txt2img", ("workflow", "txt2img")), ("fps=7.5", ("fps", 7.5))],
)
def test_params_are_json_when_they_can_be(text: str, expected: tuple[str, object]) -> None:
    assert _param(text) == expected


def test_a_batch_file_holds_requests_or_bare_prompts(tmp_path: Path) -> None:
    file = tmp_path / "batch.jsonl"
    file.write_text('{"prompt": "a", "kind": "video"}\n\nplain words\n')
    assert _batch_items(file) == [{"prompt": "a", "kind": "video"}, {"prompt": "plain words"}]
    file.write_text('{"kind": "video"}\n')
    with pytest.raises(SystemExit, match="1: not a render request"):
        _batch_items(file)
