"""A real Redis for tests: `redis-server` started on a free port, or a skip that says why there is
none (the `redis_url` fixture serves one per session)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import free_port

READY_TIMEOUT_S = 20.0


@contextmanager
def serving_redis() -> Iterator[str]:
    """A redis-server of our own on a free port (its URL), or a skip saying why not."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): Redis backend untested")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        started = time.monotonic()
        for line in process.stdout:  # bounded: redis-server either gets ready or exits
            if "Ready to accept connections" in line:
                break
            if time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"redis-server did not get ready in {READY_TIMEOUT_S:g} s")
        else:
            pytest.fail(f"redis-server exited with {process.wait()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
