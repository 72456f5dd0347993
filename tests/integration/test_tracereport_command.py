"""`python -m tools.tracereport`: the trace report as a command, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_tracereport_otlp import renders_scenario


def test_runs_as_a_module(tmp_path: Path) -> None:
    spans = renders_scenario().write(tmp_path / "traces.jsonl")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tools.tracereport", str(spans), "--top", "0"],
        cwd=root, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "PHASES (ms)" in done.stdout and "SLOWEST TRACES" not in done.stdout
