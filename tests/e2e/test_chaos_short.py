"""The short form of `make chaos`: the stack as real processes under a small steady load, one fault of
each kind (kill -9 a worker mid-render, restart PostgreSQL, kill -9 image-fetch and metadata, an
origin that hangs every fetch), and the same invariants as the full run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.report import render_text, verdict
from tests.chaos.scenario import ChaosOptions, run_chaos


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_every_accepted_render_ends_once_and_errors_are_typed_and_brief(tmp_path: Path) -> None:
    run = await run_chaos(tmp_path, ChaosOptions.short(), say=lambda line: None)
    result = verdict(run)
    text = render_text(result)
    assert result.ok, text
    kinds = {fault.kind for fault in result.faults}
    assert kinds == {"worker_kill", "pg_restart", "imagefetch_kill", "metadata_kill", "origin_hang"}, text
    # Every fault met renders: a worker died with renders in flight, and they still finished.
    kill = next(f for f in result.faults if f.kind == "worker_kill")
    assert sum(kill.in_flight.values()) >= 1, text
    assert all(status.startswith("succeeded") for status in kill.in_flight), text
    # The hanging origin failed only renders that required their reference; others went on without.
    hang = next(f for f in result.faults if f.kind == "origin_hang")
    assert hang.without_reference >= 1, text
